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
    """Thread-safe: workers record results and drops, readers take snapshots."""

    def __init__(self, window_s: float = 5.0, maxlen: int = 4096, history: int = 20000) -> None:
        self.window_s = window_s
        self._recent: deque[tuple[float, float, int]] = deque(maxlen=maxlen)  # (publish time, latency s, n dets)
        self._history: deque[float] = deque(maxlen=history)  # latencies for the end-of-run summary
        self._lock = threading.Lock()
        self.processed = 0
        self.detections = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.dropped: Counter[str] = Counter()

    def record(self, latency_s: float, detections: int, t: float | None = None) -> None:
        """One published result."""
        t = now() if t is None else t
        with self._lock:
            self._recent.append((t, latency_s, detections))
            self._history.append(latency_s)
            self.processed += 1
            self.detections += detections
            self.first_at = t if self.first_at is None else self.first_at
            self.last_at = t

    def record_drop(self, reason: str) -> None:
        """One frame dropped for `reason`."""
        with self._lock:
            self.dropped[reason] += 1

    def snapshot(self, t: float | None = None) -> StreamSnapshot:
        """fps and latency percentiles over the window (zeros when nothing was published in it)."""
        t = now() if t is None else t
        with self._lock:
            recent = [r for r in self._recent if r[0] >= t - self.window_s]
            processed, dropped = self.processed, dict(self.dropped)
        if recent:
            lat = np.array([r[1] for r in recent]) * 1000.0
            span = max(t - recent[0][0], 1e-6) if len(recent) > 1 else self.window_s
            fps = (len(recent) - 1) / span if len(recent) > 1 else len(recent) / self.window_s
            p50, p99 = (float(x) for x in np.percentile(lat, [50, 99]))
            dets = float(np.mean([r[2] for r in recent]))
        else:
            fps = p50 = p99 = dets = 0.0
        return StreamSnapshot(fps, p50, p99, dets, processed, sum(dropped.values()), dropped)

    def lifetime(self) -> StreamSnapshot:
        """Figures over the whole run (the last `history` latencies) for the end-of-run summary."""
        with self._lock:
            lat = np.array(self._history) * 1000.0
            span = (self.last_at - self.first_at) if self.first_at is not None and self.last_at else 0.0
            processed, dets, dropped = self.processed, self.detections, dict(self.dropped)
        fps = (processed - 1) / span if span > 0 else 0.0
        p50, p99 = (float(x) for x in np.percentile(lat, [50, 99])) if len(lat) else (0.0, 0.0)
        return StreamSnapshot(fps, p50, p99, dets / processed if processed else 0.0, processed,
                              sum(dropped.values()), dropped)
