"""A registered stream: identity, state, the device it runs on, its rolling stats; the sink its source writes into."""

from __future__ import annotations

import itertools
import logging
import math
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from engines.letterbox import Letterbox

from .config import StreamSpec
from .filters import DetectionFilter
from .frames import Frame, now
from .picture_check import PICTURE_CHECK_S, PictureCheck
from .preprocess import small_grey
from .runtime import PUSH_WINDOW  # re-exported: pushcall.py imports it from here
from .snapshot import PictureRequests
from .sources.base import Source, StreamState
from .stats import StreamStats
from .tracking import Tracker
from .urls import redact_text

if TYPE_CHECKING:
    from .core import DeviceRuntime

log = logging.getLogger(__name__)

__all__ = ["PUSH_WINDOW", "Stream", "StreamView"]



@dataclass(frozen=True)
class StreamView:
    """A read-only snapshot of a stream for the API and the status table."""

    stream_id: str
    url: str
    kind: str
    state: StreamState
    device: str
    fps: float
    last_error: str
    frames_processed: int
    frames_dropped: int
    reconnects: int
    latency_p50_ms: float
    latency_p99_ms: float
    detections_per_frame: float
    width: int
    height: int
    max_fps: float = 0.0
    min_score: float = 0.0
    classes: tuple[str, ...] = ()
    zone: tuple[tuple[float, float], ...] = ()
    picture_problem: str = ""
    blind_after_s: float | None = None  # as asked for in AddStream (None: the server's --blind-after-s)
    track: bool = False
    objects: int = 0  # with track: objects counted so far
    last_error_age_s: float = 0.0  # since last_error last happened (0: none yet)
    class_min_scores: tuple[tuple[str, float], ...] = ()
    decoder: str = ""  # a pulled camera's: 'cpu' or 'nvdec' ('' before its first frame, and for pushed frames)
    failing_for_s: float = 0.0  # since the first error of the failures going on now (0: streaming, or no error)


class Stream:
    """One camera (pulled or pushed) or one-off image: numbers its frames and sends them to its device's scheduler."""

    def __init__(self, stream_id: str, url: str, kind: str, max_fps: float, slo_s: float,
                 on_ingest: Callable[[Stream], None], on_drop: Callable[[Frame, str], None],
                 on_reconnect: Callable[[Stream], None], droppable: bool = True, public: bool = True,
                 metrics_label: str | None = None, epoch: int = 0, group: str | None = None,
                 on_shed: Callable[[Stream, int], None] | None = None,
                 on_corrupt: Callable[[Stream], None] | None = None) -> None:
        self.stream_id = stream_id
        self.epoch = epoch  # this incarnation of the id: its frames carry it, and only its results are published
        self.spec: StreamSpec | None = None  # what AddStream asked for, URL credentials included (never shown)
        self.persistent = False  # kept in the state folder (added over gRPC, not from the command line)
        self.listed = False  # from the command line's cameras (--streams, --source): a SIGHUP reads them again
        self.url = url
        self.kind = kind
        self.max_fps = max_fps
        self.filter = DetectionFilter()  # what of its detections is published (AddStream's min_score, classes, zone)
        self.tracker: Tracker | None = None  # AddStream track: its objects' ids (tracking.py); None: not tracked
        self.objects = 0  # objects its tracker confirmed
        self.pictures = PictureRequests()  # GetSnapshot's callers, given the next frame's picture
        self.picture_problem = ""  # "blank" or "frozen" while its picture shows nothing (picture_check.py)
        self.decoder = ""  # where its video is decoded: 'cpu', 'nvdec' (a pulled camera's, from its first frame)
        self._picture_check: PictureCheck | None = None  # watch_picture() turns it on (pulled cameras)
        self.blind_after_s = 0.0
        self._next_picture_check = math.inf
        self.slo_s = slo_s
        self.droppable = droppable
        self.public = public
        self.metrics_label = metrics_label or stream_id
        self.group = group  # streams sharing one turn under overload (all DetectImage calls); None: its own
        self.state = StreamState.CONNECTING
        self.last_error = ""
        self.last_error_at = 0.0  # now() when last_error last happened (each retry that fails again counts)
        self.failing_since = 0.0  # now() when the failures going on began: the first error since it streamed (0: none)
        self.reconnects = 0
        self.src_hw = (0, 0)
        self.stats = StreamStats()
        self.synced = (0, 0)  # (offered, superseded) of `stats` already added to /metrics (ServerCore.sync_counts)
        self.source: Source | None = None
        self.runtime: DeviceRuntime | None = None
        self._on_ingest = on_ingest
        self._on_drop = on_drop
        self._on_reconnect = on_reconnect
        self._on_shed = on_shed  # told how many frames `admit` turned away (a device process tells the API process)
        self._on_corrupt = on_corrupt  # told of each corrupt video packet its camera's decoder skipped
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._on_close: list[Callable[[], None]] = []
        self._last_published = -1

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call `callback` once when the stream is removed (a Detect call ends when its stream is removed)."""
        with self._lock:
            closed = self.state == StreamState.STOPPED
            if not closed:
                self._on_close.append(callback)
        if closed:
            callback()

    def close(self) -> None:
        """Mark the stream STOPPED and run the close callbacks (idempotent)."""
        with self._lock:
            self.state = StreamState.STOPPED
            callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            callback()

    @property
    def device(self) -> str:
        """The device the stream runs on ('' before placement)."""
        return self.runtime.name if self.runtime else ""

    def bind(self, runtime: DeviceRuntime) -> None:
        """Run on `runtime`'s device from now on (placement, or a move after an engine failure)."""
        self.runtime = runtime
        runtime.attach(self)

    def plan(self, src_hw: tuple[int, int]) -> Letterbox:
        """The letterbox for this source size on the current device."""
        assert self.runtime is not None, "stream not placed on a device"
        return self.runtime.planner.plan(src_hw)

    def admit(self, t: float) -> bool:
        """Should the source prepare and hand over the frame that came at `t`? A camera's, not while its device is
        overloaded by measure and its turn is more than one SLO away (the scheduler's `admits`): then the frame is
        counted as offered and dropped ("superseded": a later frame of the stream takes its turn) before it costs a
        letterbox plan, a Frame, the scheduler's lock and a drop (see DeadlineScheduler._admission)."""
        runtime = self.runtime
        if runtime is None or not self.droppable or runtime.scheduler.admits(self.group or self.stream_id):
            return True
        self._shed(runtime, 1)
        return False

    def shed_ahead(self, period: float) -> int:
        """After `admit` said no, for a source that makes its own frames every `period` s (a synthetic camera): how
        many of its next frames would be shed too (the scheduler's `shed_for`). They are counted as offered and shed
        now and the source skips them: ticking each to be told no cost ~9 us, a fifth of a core at 4x overload (1,144
        cameras, one process, 2-core AMD EPYC VM). Counted ahead: a camera removed meanwhile has counted up to
        SHED_AHEAD_MAX_S of frames that never came."""
        runtime = self.runtime
        n = int(runtime.scheduler.shed_for(self.group or self.stream_id) / period) if runtime and period > 0 else 0
        if n > 0:
            self._shed(runtime, n)
        return n

    def _shed(self, runtime: DeviceRuntime, n: int) -> None:
        self.stats.note_shed(n)
        runtime.scheduler.note_shed(n)
        if self._on_shed is not None:
            self._on_shed(self, n)

    def put(self, image: np.ndarray | Callable[..., np.ndarray], letterbox: Letterbox, capture_time_us: int,
            frame_id: int | None = None,
            ingest_time: float | None = None) -> Frame | None:
        """Number the frame (unless the client did), stamp ingest time and deadline, hand it to the scheduler
        (None once the stream is removed: nothing is counted or queued any more)."""
        t = now() if ingest_time is None else ingest_time
        fid = next(self._ids) if frame_id is None else frame_id
        if self.state == StreamState.STOPPED:  # a source thread finishing its last frame after removal
            return None
        self.src_hw = letterbox.src_hw
        if self.pictures.wanted:  # GetSnapshot is waiting for this camera's next picture
            self.pictures.offer(image, fid)
        if t >= self._next_picture_check:  # every PICTURE_CHECK_S: is its picture blank or frozen?
            self._check_picture(image, t)
        deferred = callable(image)  # a camera's letterbox, run only if the frame reaches an engine
        frame = Frame(self.stream_id, fid, None if deferred else image, letterbox, capture_time_us, t,
                      t + self.slo_s, self.droppable, self.public, image if deferred else None, self.epoch)
        self._on_ingest(self)
        self.stats.record_offered(t)
        runtime = self.runtime
        replaced = runtime.scheduler.submit(frame) if runtime is not None else frame
        if replaced is not None:
            self._on_drop(replaced, "removed" if replaced is frame else "superseded")
        return frame

    def next_frame_id(self) -> int:
        """The id a device process that starts serving this stream numbers its frames from: past every published
        one (a process restarted, or a move, numbering from 0 again had each result refused until it caught up:
        a camera blind for as long as it had run)."""
        with self._lock:
            return self._last_published + 1

    def number_from(self, first: int) -> None:
        """Number this stream's next frames from `first` on (a device process taking the stream over)."""
        self._ids = itertools.count(first)

    def accept(self, frame_id: int) -> bool:
        """True if a result for `frame_id` may be published: newer than any published so far (so watchers see
        frame ids increasing even when two frames of the stream ran at once). Pushed frames keep their order."""
        if not self.droppable:
            return True
        with self._lock:
            if frame_id <= self._last_published:
                return False
            self._last_published = frame_id
            return True

    def set_state(self, state: StreamState, error: str = "") -> None:
        """Record a state change; a removed (STOPPED) stream stays STOPPED whatever its source says later."""
        with self._lock:
            if self.state == StreamState.STOPPED:
                return
            self.state = state
            if error:
                self._note(redact_text(error))  # shown by ListStreams and the status table: no passwords
            if state == StreamState.STREAMING:
                self.failing_since = 0.0
            elif error and state in (StreamState.RECONNECTING, StreamState.FAILED) and not self.failing_since:
                self.failing_since = self.last_error_at
        if state != StreamState.STREAMING and self._picture_check is not None:  # judged again once it streams
            self._picture_check = PictureCheck(self._picture_check.after_s)
            self.picture_problem = ""  # its state tells now (a device process's API side clears its own on "st")

    def watch_picture(self, after_s: float) -> None:
        """Check this camera's picture every PICTURE_CHECK_S and report one blank or frozen for `after_s` (0: not)."""
        self.blind_after_s = after_s  # a device process is told it when the stream is attached there
        if after_s > 0:
            self._picture_check = PictureCheck(after_s)
            self._next_picture_check = now()

    def _check_picture(self, image: object, t: float) -> None:
        # at uneven spacing: a looped file (or a test server's loop) must not show the same frame at every sample
        self._next_picture_check = t + PICTURE_CHECK_S * random.uniform(0.75, 1.25)
        check = self._picture_check
        try:
            grey = small_grey(image) if check is not None else None
        except Exception as e:  # in the camera's thread: a frame it cannot sample must never end the camera
            log.warning("stream %s: its picture cannot be sampled (%s: %s); its blank and frozen check is off",
                        self.stream_id, type(e).__name__, e)
            self._picture_check, self._next_picture_check = None, math.inf
            return
        if grey is None:
            return
        before = check.reported
        if check.add(grey, t) != before:
            self.note_picture(check.reported)

    def track(self, detections: np.ndarray, t: float, src_hw: tuple[int, int] | None = None,
              start_scores: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Its tracker's ids for a result's detections at time `t` (now(), monotonic) in a frame of `src_hw`, and the
        rows whose object this frame confirmed (one result at a time: two workers may publish this camera's frames
        at once)."""
        assert self.tracker is not None
        with self._lock:
            first = self.tracker.next_id
            ids, _ = self.tracker.update(detections, t, src_hw, start_scores)
            new = np.flatnonzero(ids >= first)
            self.objects += len(new)
            return ids, new

    def note_picture(self, problem: str) -> None:
        """Its picture went blank or frozen ("blank", "frozen"), or is back (""): shown in ListStreams and metrics."""
        self.picture_problem = problem
        if problem:
            log.warning("stream %s: its picture has been %s for %.0f s although frames keep coming (%s)",
                        self.stream_id, problem, self.blind_after_s,
                        "lens covered, lights off or sensor dead?" if problem == "blank"
                        else "the camera repeats one frame: restart it")
        else:
            log.info("stream %s: its picture is back", self.stream_id)

    def note_decoder(self, decoder: str) -> None:
        """Its video is decoded on `decoder` ('cpu', 'nvdec') from now on: shown in ListStreams."""
        self.decoder = decoder

    def note_error(self, error: str) -> None:
        """Record an error that leaves the state as it is (an engine failure on this stream's frames)."""
        with self._lock:
            self._note(error)

    def _note(self, error: str) -> None:
        """Keep `error` as the last one, timed now: the same error again is news too (the lock held)."""
        self.last_error, self.last_error_at = error, now()

    def restart_if_stalled(self, t: float, stall_s: float) -> None:
        """The watchdog's check: reconnect a pulled camera that is STREAMING but sent no frame for `stall_s`."""
        src = self.source
        if src is None or not src.watchdog or self.state != StreamState.STREAMING:
            return
        idle = t - src.last_frame_at
        if idle > stall_s:
            log.warning("stream %s stalled (no frame for %.1f s): reconnecting", self.stream_id, idle)
            src.restart(f"stalled: no frame for {idle:.1f} s")

    def count_reconnect(self) -> None:
        """Count one reconnect attempt (ListStreams and metrics show it)."""
        with self._lock:
            self.reconnects += 1
        self._on_reconnect(self)

    def count_corrupt(self) -> None:
        """Count one corrupt video packet skipped (metrics show it; its last_error gives the connection's count)."""
        if self._on_corrupt is not None:
            self._on_corrupt(self)

    def view(self) -> StreamView:
        """A snapshot with rates over the last few seconds."""
        snap = self.stats.snapshot()
        t = now()
        return StreamView(self.stream_id, self.url, self.kind, self.state, self.device, snap.fps, self.last_error,
                          snap.processed, snap.dropped, self.reconnects, snap.latency_p50_ms, snap.latency_p99_ms,
                          snap.detections_per_frame, self.src_hw[1], self.src_hw[0], self.max_fps,
                          self.filter.min_score, self.filter.classes, self.filter.zone, self.picture_problem,
                          self.spec.blind_after_s if self.spec is not None else None, self.tracker is not None,
                          self.objects, t - self.last_error_at if self.last_error else 0.0,
                          self.filter.class_scores, self.decoder,
                          t - self.failing_since if self.failing_since else 0.0)
