"""A device worker: K threads, one per engine instance, each looping schedule -> infer -> map boxes -> publish.

`Engine.infer` is thread-safe for `instances` callers (ONNX Runtime and TensorRT release the GIL
while running), so K threads keep K sessions / execution contexts busy at once; while one batch
runs, the next is scheduled by the thread that finished first. Boxes are mapped back to each
frame's source pixels with the letterbox the frame carries (Letterbox.unscale).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np

from engines.base import Engine

from . import priority
from .frames import Frame, FrameResult, now
from .scheduler import Batch, Scheduler

__all__ = ["DeviceWorker"]

log = logging.getLogger(__name__)

FAILURES_BEFORE_UNHEALTHY = 3


class DeviceWorker:
    """Runs batches from `scheduler` on `engine` with `threads` concurrent callers; reports each batch and result."""

    def __init__(self, device: str, engine: Engine, scheduler: Scheduler, publish: Callable[[FrameResult], None],
                 threads: int = 1, on_batch: Callable[[str, int, float], None] | None = None,
                 on_failure: Callable[[str, str], None] | None = None) -> None:
        self.device = device
        self.engine = engine
        self.scheduler = scheduler
        self.publish = publish
        self.threads = max(1, int(threads))
        self.on_batch = on_batch or (lambda device, size, seconds: None)
        self.on_failure = on_failure or (lambda device, error: None)
        self.consecutive_failures = 0
        self.batches = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the K worker threads."""
        for i in range(self.threads):
            t = threading.Thread(target=self._loop, name=f"worker-{self.device}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        """Let running batches finish (up to `timeout`), then end the threads."""
        self._stop.set()
        self.scheduler.shutdown()
        end = now() + timeout
        for t in self._threads:
            t.join(max(0.0, end - now()))
        self._threads = []

    def _loop(self) -> None:
        priority.keep_default()  # inference runs ahead of the server's other threads (priority.py)
        while not self._stop.is_set():
            batch = self.scheduler.schedule(timeout=0.2)
            if batch is not None:
                self.run(batch)

    def run(self, batch: Batch) -> None:
        """Run one batch and publish one result per frame (an error result for each frame if the engine failed,
        or for a frame whose deferred letterbox failed: its batch-mates still run)."""
        t0 = now()
        frames, inputs, unprepared = self._prepare(batch.frames)
        error = None
        outputs: list[np.ndarray] = []
        if frames:
            try:
                outputs = self.engine.infer(inputs)
                if len(outputs) != len(frames):
                    raise RuntimeError(f"engine returned {len(outputs)} results for a batch of {len(frames)}")
            except Exception as e:  # one failed batch must not kill the worker: report it and go on
                error = f"{type(e).__name__}: {e}"
                outputs = [np.zeros((0, 6), np.float32)] * len(frames)
        elapsed = now() - t0
        for frame, dets in zip(frames, outputs):
            self._publish(frame, frame.letterbox.unscale(dets), error)
        for frame, why in unprepared:
            self._publish(frame, np.zeros((0, 6), np.float32), why)
        # a failed run, or a smaller batch than scheduled, says nothing about the scheduled batch's run time
        self.scheduler.update_from_output(batch, None if error or unprepared else elapsed)
        if not frames:
            return
        with self._lock:  # K threads share the counters
            self.batches += 1
            self.consecutive_failures = 0 if error is None else self.consecutive_failures + 1
            report = self.consecutive_failures == FAILURES_BEFORE_UNHEALTHY
        if error is None:
            self.on_batch(self.device, len(frames), elapsed)
            return
        log.error("%s: batch of %d failed: %s", self.device, len(frames), error)
        if report:
            self.on_failure(self.device, error)

    @staticmethod
    def _prepare(batch: list[Frame]) -> tuple[list[Frame], np.ndarray, list[tuple[Frame, str]]]:
        """(frames, their engine input [n, h, w, 3], [(frame, error)] for those whose deferred conversion raised).

        Frames of a batch are letterboxed straight into one batch array (a frame a batch-mate failed to fill
        is taken by the next): stacking them afterwards copied every frame again, 24 MB a batch of 32 at 640."""
        frames: list[Frame] = []
        unprepared: list[tuple[Frame, str]] = []
        single = len(batch) == 1
        array = None if single else np.empty((len(batch), *batch[0].shape, 3), np.uint8)
        for frame in batch:
            try:
                x = frame.materialize() if single else frame.materialize(out=array[len(frames)])
                frames.append(frame)
            except Exception as e:  # a bad decoded frame fails alone, not its batch-mates
                unprepared.append((frame, f"cannot prepare the frame: {type(e).__name__}: {e}"))
                log.warning("%s frame %d: %s", frame.stream_id, frame.frame_id, unprepared[-1][1])
        if single:
            return frames, (x[None] if frames else np.empty((0, 0, 0, 3), np.uint8)), unprepared
        return frames, array[:len(frames)], unprepared

    def _publish(self, frame: Frame, boxes: np.ndarray, error: str | None) -> None:
        self.publish(FrameResult(frame.stream_id, frame.frame_id, boxes, frame.letterbox.src_hw,
                                 frame.capture_time_us, now() - frame.ingest_time, self.device, frame.public, error,
                                 frame.epoch))
