"""Rolling per-stream figures for ListStreams and the live status table: fps, p50/p99 latency, detections, drops."""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass

import numpy as np

from .frames import now

__all__ = ["StreamSnapshot", "StreamStats"]


@dataclass(frozen=True)
class StreamSnapshot:
    """Figures over the last `window_s` seconds, plus lifetime counters."""

    fps: float
    latency_p50_ms: float
    latency_p99_ms: float
    detections_per_frame: float
    processed: int
    dropped: int
    dropped_by_reason: dict[str, int]


class StreamStats:
    """Thread-safe: workers record results and drops, readers take snapshots. Only the window's results are
    kept for the rolling figures (older ones are let go as new ones come), so a reader's cost, paid under the
    lock the workers record with, is the window's results, not the last `maxlen`."""

    def __init__(self, window_s: float = 5.0, maxlen: int = 4096, history: int = 20000) -> None:
        self.window_s = window_s
        self._recent: deque[tuple[float, float, int]] = deque(maxlen=maxlen)  # (publish time, latency s, n dets)
        # the last `history` latencies (s) for the end-of-run summary, a float32 ring made at the first result: 80 KB a
        # camera once full, where a deque of float objects held 640 KB (a steady server's memory rose for an hour)
        self._history_size = history
        self._history: np.ndarray | None = None
        self._history_n = 0  # latencies recorded in all (the ring holds the last `history`)
        self._lock = threading.Lock()
        self.processed = 0
        self.detections = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.dropped: Counter[str] = Counter()
        self._offered: deque[float] = deque()  # when each frame of the window was offered (ingested)
        self._offered_total = 0  # frames offered in all (with those shed: `counts`)
        self._shed = 0  # frames shed at the source, counted without the lock by the camera's one thread (note_shed)
        self._shed_taken = 0  # of those, the ones already in the offered counts, the window and the drops

    def record(self, latency_s: float, detections: int, t: float | None = None) -> None:
        """One published result."""
        t = now() if t is None else t
        with self._lock:
            self._take_shed(t)
            self._recent.append((t, latency_s, detections))
            while self._recent[0][0] < t - self.window_s:
                self._recent.popleft()
            if self._history is None:
                self._history = np.empty(self._history_size, np.float32)
            self._history[self._history_n % self._history_size] = latency_s
            self._history_n += 1
            self.processed += 1
            self.detections += detections
            self.first_at = t if self.first_at is None else self.first_at
            self.last_at = t

    def record_offered(self, t: float, n: int = 1) -> None:
        """`n` frames handed to the scheduler (run, dropped or not) at `t`: the stream's offered load."""
        with self._lock:
            self._take_shed(t)
            self._offer(t, n)

    def record_shed(self, t: float, n: int = 1) -> None:
        """`n` frames of a camera not handed over under overload: offered, and dropped as superseded (a device
        process's summed count; the camera's own thread calls `note_shed` per frame)."""
        with self._lock:
            self._take_shed(t)
            self._offer(t, n)
            self.dropped["superseded"] += n

    def note_shed(self, n: int = 1) -> None:
        """`n` frames of this camera not handed over under overload (Stream.admit), counted without the lock: past
        capacity most ticks shed, and the lock, the window's deque and the drop counter were 3 of a shed tick's ~9
        us (1,000 cameras on the 2-core VM). Only the thread delivering the camera's frames calls it (one at a
        time: no count is lost); the next locked call takes the count in (`_take_shed`), so readers see it all."""
        self._shed += n

    def _take_shed(self, t: float) -> None:
        """Move the frames shed since the last call into the counts, the window (at `t`: no reader asks the rate
        to a finer grain than its own calls) and the drops (caller holds the lock)."""
        n = self._shed - self._shed_taken
        if n > 0:
            self._shed_taken += n
            self._offer(t, n)
            self.dropped["superseded"] += n

    def counts(self) -> tuple[int, int]:
        """(frames offered, frames superseded) so far, those shed at the source included."""
        with self._lock:
            self._take_shed(now())
            return self._offered_total, self.dropped["superseded"]

    def _offer(self, t: float, n: int) -> None:
        self._offered_total += n
        if n == 1:
            self._offered.append(t)
        else:
            self._offered.extend([t] * n)
        while self._offered[0] < t - self.window_s:
            self._offered.popleft()

    def offered_fps(self, t: float | None = None) -> float:
        """Frames offered per second over the window: what placement needs (the processed rate of a camera on an
        overloaded device is what it lost, not what it asks for)."""
        t = now() if t is None else t
        with self._lock:
            self._take_shed(t)
            while self._offered and self._offered[0] < t - self.window_s:
                self._offered.popleft()
            n = len(self._offered)
            if n > 1:
                return (n - 1) / max(t - self._offered[0], 1e-6)
            return n / self.window_s

    def record_drop(self, reason: str, n: int = 1) -> None:
        """`n` frames dropped for `reason`."""
        with self._lock:
            self.dropped[reason] += n

    def snapshot(self, t: float | None = None) -> StreamSnapshot:
        """fps and latency percentiles over the window (zeros when nothing was published in it)."""
        t = now() if t is None else t
        with self._lock:
            self._take_shed(t)
            recent = self._in_window(t)
            processed, dropped = self.processed, dict(self.dropped)
        if recent:
            lat = np.array([r[1] for r in recent]) * 1000.0
            p50, p99 = (float(x) for x in np.percentile(lat, [50, 99]))
            dets = float(np.mean([r[2] for r in recent]))
        else:
            p50 = p99 = dets = 0.0
        return StreamSnapshot(self._rate(recent, t), p50, p99, dets, processed, sum(dropped.values()), dropped)

    def fps(self, t: float | None = None) -> float:
        """Results per second over the window (what placement needs, without the percentiles)."""
        t = now() if t is None else t
        with self._lock:
            return self._rate(self._in_window(t), t)

    def _in_window(self, t: float) -> list[tuple[float, float, int]]:
        """The results published within the window before `t`, oldest first (caller holds the lock)."""
        recent = []
        for r in reversed(self._recent):  # newest first: stops at the window's start
            if r[0] < t - self.window_s:
                break
            recent.append(r)
        recent.reverse()
        return recent

    def _rate(self, recent: list[tuple[float, float, int]], t: float) -> float:
        if len(recent) > 1:
            return (len(recent) - 1) / max(t - recent[0][0], 1e-6)
        return len(recent) / self.window_s

    def lifetime(self) -> StreamSnapshot:
        """Figures over the whole run (the last `history` latencies) for the end-of-run summary."""
        with self._lock:
            self._take_shed(now())
            kept = min(self._history_n, self._history_size)
            lat = self._history[:kept] * 1000.0 if self._history is not None else np.empty(0, np.float32)
            span = (self.last_at - self.first_at) if self.first_at is not None and self.last_at else 0.0
            processed, dets, dropped = self.processed, self.detections, dict(self.dropped)
        fps = (processed - 1) / span if span > 0 else 0.0
        p50, p99 = (float(x) for x in np.percentile(lat, [50, 99])) if len(lat) else (0.0, 0.0)
        return StreamSnapshot(fps, p50, p99, dets / processed if processed else 0.0, processed,
                              sum(dropped.values()), dropped)
