"""The two records that travel the pipeline: a `Frame` (letterboxed input, where it came from) and its `FrameResult`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engines.letterbox import Letterbox

__all__ = ["Frame", "FrameResult", "now"]

now = time.perf_counter  # the pipeline's clock (seconds, monotonic, shared by all threads)


@dataclass(eq=False)
class Frame:
    """One frame for the engine: `input` is uint8 [h, w, 3] RGB, letterboxed to the device's input shape.

    A camera hands over `prepare` instead (the letterbox of a decoded frame, not yet run): newest-wins drops
    most frames of a busy camera, so only the frames that reach an engine pay for the conversion.
    """

    stream_id: str
    frame_id: int
    input: np.ndarray | None
    letterbox: Letterbox
    capture_time_us: int  # wall clock, microseconds since the epoch (the camera's or the client's)
    ingest_time: float  # now() when the frame was handed to the scheduler (push: when it was received)
    deadline: float  # ingest_time + SLO
    droppable: bool = True  # pulled cameras: may be dropped as "late"; pushed frames are always answered
    public: bool = True  # False: a one-off DetectImage frame, not shown to WatchDetections(all)
    prepare: Callable[..., np.ndarray] | None = None  # builds `input` when it is None: prepare(out=None)
    epoch: int = 0  # the incarnation of its stream: a stream removed and added again under the same id is new

    shape: tuple[int, int] = field(init=False)  # the input (h, w): frames of the same shape batch together

    def __post_init__(self) -> None:
        # worked out once: the scheduler asks for it several times per pick (a deferred input is built to it)
        self.shape = self.letterbox.input_hw if self.input is None else (self.input.shape[0], self.input.shape[1])

    def materialize(self, out: np.ndarray | None = None) -> np.ndarray:
        """The engine input, built now if it was deferred (by the worker that runs the frame); with `out` (its
        place in the batch array) built or copied there, so that a batch is not stacked from copies."""
        if self.input is None:
            self.input, self.prepare = (self.prepare() if out is None else self.prepare(out=out)), None
        if out is not None and self.input is not out:  # an input built elsewhere (pushed, or out not honoured)
            out[...] = self.input
            return out
        return self.input


@dataclass(eq=False)
class FrameResult:
    """Detections of one frame in source-frame pixels ([n, 6] x1 y1 x2 y2 score class), or the error that stopped it."""

    stream_id: str
    frame_id: int
    detections: np.ndarray
    src_hw: tuple[int, int]
    capture_time_us: int
    latency_s: float  # ingest to publish
    device: str
    public: bool = True
    error: str | None = None
    epoch: int = 0  # the incarnation of the stream that sent the frame (Frame.epoch)
    model_version: str = ""  # the engine that ran it (runtime.model_version); '' when none did
    drop_reason: str = ""  # the frame was dropped before it ran ('late', ...): `error` says so to its caller
    track_ids: np.ndarray | None = None  # per detection, on a tracked camera (tracking.py; 0: seen once so far)
    ingest_time: float = 0.0  # its frame's Frame.ingest_time (now(), monotonic): the tracker's clock; 0: unknown
