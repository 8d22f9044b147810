"""A device worker: K threads, one per engine instance, each looping schedule -> infer -> map boxes -> publish.

`Engine.infer` is thread-safe for `instances` callers (ONNX Runtime and TensorRT release the GIL
while running), so K threads keep K sessions / execution contexts busy at once; while one batch
runs, the next is scheduled by the thread that finished first. Boxes are mapped back to each
frame's source pixels with the letterbox the frame carries (Letterbox.unscale).

Every engine call is registered with the run supervisor (supervisor.py) under a deadline. A run declared hung
is answered by `abandon` (error results for its frames, the batch released) from the supervisor's thread, and
its thread is replaced: the stuck thread exits if its call ever returns. A thread never dies silently: an
exception outside the engine call is logged and counted (`on_error`) and the loop goes on. A batch the engine
refuses before running it (`Engine.check_batch`: a shape or size it cannot take) fails its frames alone, as
their streams' errors, never the device's. The engine is read once per batch, so a swap (`engine = new`) takes
effect between batches.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engines.base import PAD_VALUE, Engine, EngineError

from . import priority
from .faultlog import FaultLog
from .frames import Frame, FrameResult, now
from .scheduler import Batch, Scheduler
from .supervisor import Run, RunDeadline, RunSupervisor

__all__ = ["BatchOutcome", "DeviceWorker"]

log = logging.getLogger(__name__)

EMPTY = np.zeros((0, 6), np.float32)


@dataclass(frozen=True)
class BatchOutcome:
    """One batch the engine ran, or raised on (`error`): what the device's health and metrics learn from it."""

    device: str
    shape: tuple[int, int]
    size: int
    seconds: float
    started: float
    error: str | None = None


class DeviceWorker:
    """Runs batches from `scheduler` on `engine` with `threads` concurrent callers; reports each batch and result."""

    def __init__(self, device: str, engine: Engine, scheduler: Scheduler, publish: Callable[[FrameResult], None],
                 threads: int = 1, on_outcome: Callable[[BatchOutcome], None] | None = None,
                 on_error: Callable[[str], None] | None = None, supervisor: RunSupervisor | None = None,
                 deadline: RunDeadline | None = None, model_version: str = "") -> None:
        self.device = device
        self._model = (engine, model_version)  # one attribute: a swap replaces both at once (`use`)
        self.scheduler = scheduler
        self.publish = publish
        self.threads = max(1, int(threads))
        self.on_outcome = on_outcome or (lambda outcome: None)
        self.on_error = on_error or (lambda device: None)
        self.supervisor = supervisor or RunSupervisor(lambda run: None)  # without one nothing is ever hung
        self.deadline = deadline or RunDeadline()
        self.batches = 0
        self.errors = 0  # exceptions caught outside the engine call
        self.replaced = 0  # threads replaced after a hung run
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._retired: set[threading.Thread] = set()
        self._serial = 0
        # an engine failing every batch wrote a line per batch (20 a second for two 10 fps cameras): on change only
        self._failures = FaultLog(log, "%s: engine runs", (device,), logging.ERROR, recovery_after=2)
        self._refusals = FaultLog(log, "%s: the engine cannot take some frames", (device,))

    @property
    def engine(self) -> Engine:
        """The engine batches run on (from the next batch on, after `use`)."""
        return self._model[0]

    @property
    def model_version(self) -> str:
        """The version stamped on results of the engine in use."""
        return self._model[1]

    def use(self, engine: Engine, model_version: str) -> None:
        """Run the next batches on `engine` (a hot swap): batches running finish on the old one."""
        self._model = (engine, model_version)

    def start(self) -> None:
        """Start the K worker threads."""
        for _ in range(self.threads):
            self._spawn()

    def _spawn(self) -> None:
        with self._lock:
            self._serial += 1
            t = threading.Thread(target=self._loop, name=f"worker-{self.device}-{self._serial - 1}", daemon=True)
            self._threads.append(t)
        t.start()

    @property
    def live_threads(self) -> int:
        """Threads serving now (not counting those stuck in a hung run)."""
        with self._lock:
            return sum(t.is_alive() for t in self._threads)

    def stop(self, timeout: float = 5.0) -> None:
        """Let running batches finish (up to `timeout`), then end the threads (a thread stuck in a hung run is left)."""
        self._stop.set()
        self.scheduler.shutdown()
        end = now() + timeout
        with self._lock:
            threads, self._threads = self._threads, []
        for t in threads:
            t.join(max(0.0, end - now()))

    def _loop(self) -> None:
        priority.keep_default()  # inference runs ahead of the server's other threads (priority.py)
        me = threading.current_thread()
        while not self._stop.is_set() and me not in self._retired:
            try:
                batch = self.scheduler.schedule(timeout=0.2)
                if batch is not None:
                    self.run(batch)
            except Exception:  # one bad batch or bug must not end a thread: K threads would silently become K-1
                with self._lock:
                    self.errors += 1
                log.exception("%s: worker error (counted in yolov12_worker_errors_total; the thread goes on)",
                              self.device)
                self.on_error(self.device)
                self._stop.wait(0.01)  # no hot loop if the error repeats

    def run(self, batch: Batch) -> bool:
        """Run one batch and publish one result per frame (an error result for each frame if the engine failed or
        refused the batch, or for a frame whose deferred letterbox failed: its batch-mates still run). Returns
        False when the run was declared hung meanwhile (its frames answered by `abandon`)."""
        t0 = now()
        learned: float | None = None
        released = False
        try:
            engine, version = self._model  # once per batch: a swap takes effect at the next
            frames, inputs, unprepared = self._prepare(batch.frames, engine.info.batch[0])
            for frame, why in unprepared:
                self._publish(frame, EMPTY, why)
            if not frames:
                return True
            try:
                engine.check_batch(inputs)
            except EngineError as e:  # the frames' shape or number, not the device: their streams' error
                why = f"the engine cannot take this frame: {e}"
                self._refusals.failed(f"{e} (frames of {frames[0].stream_id})")
                for frame in frames:
                    self._publish(frame, EMPTY, why)
                return True
            shape = (int(inputs.shape[1]), int(inputs.shape[2]))
            run = self.supervisor.begin(self.device, shape, len(frames), self.deadline(batch.predicted_s),
                                        owner=(batch, frames))
            error = None
            outputs: list[np.ndarray] = []
            try:
                outputs = engine.infer(inputs)
                if len(outputs) != len(inputs):
                    raise RuntimeError(f"engine returned {len(outputs)} results for a batch of {len(inputs)}")
                outputs = outputs[:len(frames)]  # the padding's (an engine's minimum batch) dropped
            except Exception as e:  # one failed batch must not kill the worker: report it and go on
                error = f"{type(e).__name__}: {e}"
                outputs = [EMPTY] * len(frames)
            elapsed = now() - t0
            if not self.supervisor.end(run):
                released = True  # declared hung: `abandon` answered the frames and released the batch
                log.warning("%s: the hung %s came back after %.1f s", self.device, run.describe(), elapsed)
                return False
            for frame, dets in zip(frames, outputs):
                self._publish(frame, frame.letterbox.unscale(dets), error, version)
            # a failed run, or a smaller batch than scheduled, says nothing about the scheduled batch's run time
            learned = None if error or unprepared else elapsed
            with self._lock:  # K threads share the counter
                self.batches += 1
            if error is not None:
                self._failures.failed(error)
            elif self._failures.failures:
                self._failures.ok("work again")
            self._report(BatchOutcome(self.device, shape, len(frames), elapsed, batch.scheduled_at, error))
            return True
        finally:
            if not released:
                self.scheduler.update_from_output(batch, learned)

    def _report(self, outcome: BatchOutcome) -> None:
        try:
            self.on_outcome(outcome)
        except Exception:
            log.exception("%s: reporting a batch failed", self.device)

    def abandon(self, run: Run) -> None:
        """Answer a run declared hung (error results for its frames, its batch released) and retire its thread
        (called from the supervisor's thread; the stuck thread exits if its call ever returns). `replenish`
        then starts its replacement."""
        batch, frames = run.owner
        why = f"engine run hung: no answer within {run.deadline_s:.1f} s ({run.describe()})"
        for frame in frames:
            self._publish(frame, EMPTY, why)
        self.scheduler.update_from_output(batch, None)
        with self._lock:
            self._retired.add(run.thread)
            if run.thread in self._threads:
                self._threads.remove(run.thread)
                self.replaced += 1

    def replenish(self) -> None:
        """Start threads until `threads` serve again (after `abandon` retired one)."""
        while not self._stop.is_set():
            with self._lock:
                if len(self._threads) >= self.threads:
                    return
            self._spawn()

    @staticmethod
    def _prepare(batch: list[Frame], min_batch: int = 1) -> tuple[list[Frame], np.ndarray,
                                                                   list[tuple[Frame, str]]]:
        """(frames, their engine input [n, h, w, 3], [(frame, error)] for those whose deferred conversion raised).

        Frames of a batch are letterboxed straight into one batch array (a frame a batch-mate failed to fill
        is taken by the next): stacking them afterwards copied every frame again, 24 MB a batch of 32 at 640.
        An engine that takes no fewer than `min_batch` frames (a static --batch 8 TensorRT engine) gets the
        batch padded with grey frames up to it; their results are dropped."""
        frames: list[Frame] = []
        unprepared: list[tuple[Frame, str]] = []
        single = len(batch) == 1 and min_batch <= 1
        array = None if single else np.empty((max(len(batch), min_batch), *batch[0].shape, 3), np.uint8)
        for frame in batch:
            try:
                x = frame.materialize() if single else frame.materialize(out=array[len(frames)])
                frames.append(frame)
            except Exception as e:  # a bad decoded frame fails alone, not its batch-mates
                unprepared.append((frame, f"cannot prepare the frame: {type(e).__name__}: {e}"))
                log.warning("%s frame %d: %s", frame.stream_id, frame.frame_id, unprepared[-1][1])
        if single:
            return frames, (x[None] if frames else np.empty((0, 0, 0, 3), np.uint8)), unprepared
        rows = max(len(frames), min_batch) if frames else 0
        array[len(frames):rows] = PAD_VALUE
        return frames, array[:rows], unprepared

    def _publish(self, frame: Frame, boxes: np.ndarray, error: str | None, version: str | None = None) -> None:
        self.publish(FrameResult(frame.stream_id, frame.frame_id, boxes, frame.letterbox.src_hw,
                                 frame.capture_time_us, now() - frame.ingest_time, self.device, frame.public, error,
                                 frame.epoch, self.model_version if version is None else version,
                                 ingest_time=frame.ingest_time))
