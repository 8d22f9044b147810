"""What serves one device: its engine (loaded and warmed up), input planner, run-time model, scheduler, worker and
health; how an engine is loaded and warmed up (at start and for a hot swap), and the probe that re-checks it.

The server core keeps one `DeviceRuntime` per device and talks to a device only through it, so that a device can
later live in a worker process of its own behind the same few calls (probe, swap, close).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engines.base import Engine, EngineInfo, run_padded
from engines.letterbox import aspect_shapes

from . import priority
from .costmodel import RunTimeModel
from .frames import now
from .health import DeviceHealth
from .preprocess import InputPlanner
from .scheduler import DeadlineScheduler
from .supervisor import RunDeadline, RunSupervisor
from .worker import DeviceWorker

__all__ = ["CAMERA_HW", "DeviceRuntime", "EngineLoader", "LoadedEngine", "load_engine", "model_version",
           "plannable_shapes", "release_freed_memory", "warm_up"]

if TYPE_CHECKING:
    from .stream import Stream

log = logging.getLogger(__name__)

PUSH_WINDOW = 2  # frames a push call may have waiting or running: one decoding/queued while one runs
EngineLoader = Callable[..., Engine]  # (path, device=server device ('cpu:1'), instances=..., **opts) -> Engine
CAMERA_HW = (360, 640)  # a typical 16:9 camera: the shape warm-up measures and probes of a known shape use


def model_version(path: str | Path) -> str:
    """The model's version as results and GetServerInfo show it: the first 12 hex digits of the file's SHA-256
    (a re-exported or retrained file is a new version, a copy of the same file is not)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def release_freed_memory() -> None:
    """Hand memory freed inside the process back to the OS (glibc's malloc_trim; elsewhere nothing). An engine
    closed after a hot swap frees its sessions, but glibc kept the pages: the demo model's server grew 135 MB
    over two swaps, and came back to where it was with this."""
    with contextlib.suppress(OSError, AttributeError):  # no glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class LoadedEngine:
    """An engine opened on a device and warmed up: ready to serve, not yet serving."""

    path: str
    engine: Engine
    planner: InputPlanner
    cost: RunTimeModel
    max_batch: int
    frame_cost_s: float  # seconds per camera frame at the batch size that runs them fastest (placement's cost)
    version: str

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    @property
    def instances(self) -> int:
        """Engine instances that run at once: as asked for, or fewer where the engine cannot (a TensorRT engine
        built with fewer optimisation-profile sets than --instances says so at load and serves with those)."""
        return max(1, int(getattr(self.engine, "instances", 1)))

    @property
    def camera_shape(self) -> tuple[int, int]:
        """The input shape a 16:9 camera gets on this engine."""
        return self.planner.input_shape(CAMERA_HW)

    @property
    def known_shapes(self) -> list[tuple[int, int]]:
        """Input shapes the warm-up ran: a probe of one of these tells a failing device from a failing input."""
        return [self.camera_shape, self.planner.full_shape]


def load_engine(loader: EngineLoader, device: str, path: str, instances: int, max_batch: int,
                threads: int | None) -> LoadedEngine:
    """Open `path` on `device` with `instances` instances and warm it up (blocking, seconds); EngineError and the
    like propagate (a bad file is refused before anything serves from it)."""
    opts = {"threads": threads} if threads and path.lower().endswith(".onnx") else {}
    version = model_version(path)
    before = priority.native_threads()
    engine = loader(path, device=device, instances=instances, **opts)
    priority.favour(priority.native_threads() - before)  # its intra-op pools run inference too
    try:
        info = engine.info
        planner = InputPlanner.for_engine(info)
        batch = max(1, min(max_batch, info.batch[1]))
        served = max(1, int(getattr(engine, "instances", instances)))
        if served < instances:
            log.warning("%s on %s: %d engine instances asked for, the engine runs %d at once (TensorRT: one "
                        "optimisation-profile set per execution context); serving with %d", path, device, instances,
                        served, served)
        engine.prepare(plannable_shapes(planner), batch)  # CUDA graphs captured now, not while serving
        cost = RunTimeModel()
        warm_up(engine, planner, cost, batch, served)
        camera = planner.input_shape(CAMERA_HW)
        frame_cost = min(cost.predict(n, camera, 0.5) / n for n in range(1, batch + 1))
    except BaseException:
        engine.close()
        raise
    return LoadedEngine(path, engine, planner, cost, batch, frame_cost, version)


def plannable_shapes(planner: InputPlanner) -> list[tuple[int, int]]:
    """The input shapes the planner can give frames: an engine's built shapes, its one size, or (any stride
    multiple) the shapes of common camera aspects (16:9, 4:3, 1:1 and their portrait forms) and the full size."""
    if planner.shapes is not None:
        return list(planner.shapes)
    if not planner.dynamic_hw:
        return [planner.imgsz]
    return aspect_shapes(planner.imgsz, planner.stride)


def warm_up(engine: Engine, planner: InputPlanner, cost: RunTimeModel, max_batch: int, instances: int) -> float:
    """Seed the cost model: batch 1 at the full input, batches 1, 2, 4 .. max_batch at a 16:9 camera's shape
    (how much batching pays on this device), and those again on all instances at once (how much they slow
    each other down); returns seconds per frame at the full input."""
    camera = planner.input_shape(CAMERA_HW)
    sizes = sorted({1, max_batch, *(2**i for i in range(8) if 2**i < max_batch)})
    full_shape = planner.full_shape
    runs = [(full_shape, 1)] + [(camera, n) for n in sizes]
    full = 0.0
    for shape, n in runs:
        x = np.full((n, *shape, 3), 114, np.uint8)
        for _ in range(instances):  # each instance's first run of a shape (allocations, kernel selection, a
            run_padded(engine, x)  # CUDA graph capture) stays out of the timed run, which borrows the first again
        t0 = now()
        run_padded(engine, x)  # padded up to the engine's minimum batch (a static --batch 8 engine)
        dt = now() - t0
        cost.observe(n, shape, dt)
        if (shape, n) == (full_shape, 1):
            full = dt
    for n in sizes if instances > 1 else ():
        x = np.full((n, *camera, 3), 114, np.uint8)
        times: list[float] = []

        def run(x: np.ndarray = x, times: list[float] = times) -> None:
            t0 = now()
            run_padded(engine, x)
            times.append(now() - t0)

        for _ in range(2):  # the first round is some instances' first run of the shape: not a fair figure
            times.clear()
            threads = [threading.Thread(target=run) for _ in range(instances)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        for dt in times:
            cost.observe(n, camera, dt, others=instances - 1)
    return full


@dataclass(eq=False)
class DeviceRuntime:
    """Everything that serves one device: its engine, input planner, cost model, scheduler, worker and health."""

    name: str
    loaded: LoadedEngine
    scheduler: DeadlineScheduler
    worker: DeviceWorker
    health: DeviceHealth
    probing: bool = False  # a probe thread runs (at most one per device: a hung probe blocks only itself)
    last_probe: float = field(default_factory=now)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def engine(self) -> Engine:
        return self.loaded.engine

    @property
    def engine_path(self) -> str:
        return self.loaded.path

    @property
    def planner(self) -> InputPlanner:
        return self.loaded.planner

    @property
    def cost(self) -> RunTimeModel:
        return self.loaded.cost

    @property
    def max_batch(self) -> int:
        return self.loaded.max_batch

    @property
    def version(self) -> str:
        return self.loaded.version

    def attach(self, stream: Stream) -> None:
        """Serve `stream` here (Stream.bind): a camera's frames newest-wins, and several may run at once (results
        re-ordered by Stream.accept); pushed frames in a small FIFO window, one running at a time, each answered in
        order. A device in another process (procs/remote.py) sends the same over its pipe."""
        if stream.droppable:
            self.scheduler.add_stream(stream.stream_id, epoch=stream.epoch, group=stream.group)
        else:
            self.scheduler.add_stream(stream.stream_id, capacity=PUSH_WINDOW, exclusive=True, epoch=stream.epoch,
                                      group=stream.group)

    def swap(self, new: LoadedEngine) -> LoadedEngine:
        """Serve with `new` from the next batch on (its run-time model and batch limit too); returns the old one,
        still running the batches that started on it."""
        old, self.loaded = self.loaded, new
        self.scheduler.cost = new.cost
        self.scheduler.max_batch = new.max_batch
        self.worker.use(new.engine, new.version)
        return old

    def probe(self, shape: tuple[int, int], size: int, supervisor: RunSupervisor,
              deadline: RunDeadline) -> tuple[bool | None, str]:
        """Run a grey batch of `size` frames of `shape` under the supervisor (call off the hot paths: it may never
        return): (True, ''), (False, error), or (None, '') when it was declared hung meanwhile (the supervisor
        reported that)."""
        x = np.full((size, *shape, 3), 114, np.uint8)
        engine = self.engine
        run = supervisor.begin(self.name, shape, size, deadline(self.cost.predict(size, shape, 0.9)))
        try:
            run_padded(engine, x)
            ok, error = True, ""
        except Exception as e:
            ok, error = False, f"{type(e).__name__}: {e}"
        if not supervisor.end(run):
            return None, ""
        return ok, error
