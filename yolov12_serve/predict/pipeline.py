"""`Predictor`: the server's engines, letterboxing, scheduler and device workers driven in-process for `predict`.

One library, two front doors: per device an engine (`engines.load`), an `InputPlanner`, a `DeadlineScheduler`
and a `DeviceWorker` with one thread per engine instance, exactly as `ServerCore` builds them; frames are the
server's `Frame`s and come back as its `FrameResult`s. What differs is only how frames are offered:

- Offline inputs (files, folders, videos, arrays) are read by one reader thread, letterboxed there (every
  frame reaches the engine, so nothing is gained by deferring it) and offered with no deadline, so the
  scheduler never drops one. The scheduler batches only the head frames of distinct streams, so the reader
  spreads frames over `lanes` (streams of one frame each: `batch` per instance, plus a batch waiting) on
  every device; a lane takes its next frame once its last one is answered. Results are put back in reading
  order. The reader waits while `window` frames are read but not yet handed to the caller: memory stays
  bounded however slowly the results are consumed.
- Live inputs (cameras) are the server's sources feeding a sink of ours: one stream per camera with the
  server's one-frame, newest-wins mailbox (a frame not yet taken when the next arrives is dropped as
  superseded), letterboxed only if it reaches an engine, cameras spread round-robin over the devices. The
  results are newest-wins too: a camera's result the caller has not taken when the next one comes is
  dropped (the server's fan-out does the same to a slow subscriber), so a slow caller always gets the
  freshest frame and a camera holds at most a frame waiting, one per engine instance and one result.
  A camera that cannot be reached at first is an error; one that drops later is reconnected with backoff.

Device: 'cpu', 'cpu:N' (N CPU engines sharing the cores: what several GPUs look like, on a laptop), a GPU
('0', 'cuda:1', 1), or several ('0,1', '0-3', [0, 1]). Offline frames go to whichever device has a free
lane (faster devices take more); cameras are placed round-robin.

Thresholds: `.pt` engines and raw-head ONNX graphs run NMS on the host with the `conf`, `iou` and `max_det`
asked for; end-to-end ONNX / TensorRT graphs carry theirs from export (yolov12-export --conf/--iou), so there
a higher `conf` or a smaller `max_det` filters on the host and a lower `conf`, another `iou` or a larger `max_det`
is warned about once (export again to get it). `classes` is always a host filter.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import engines
from engines.base import Engine, EngineError, EngineInfo
from engines.letterbox import aspect_shapes

from ..config import MAX_INSTANCES
from ..costmodel import RunTimeModel
from ..frames import Frame, FrameResult, now
from ..preprocess import InputPlanner, source_picture
from ..runtime import plannable_shapes
from ..scheduler import DeadlineScheduler
from ..tracking import Tracker
from ..worker import DeviceWorker
from .inputs import Decoded, Input, SourceError, Sources, read_offline, resolve_sources
from .results import Boxes, Result

__all__ = ["PredictError", "Predictor", "parse_device"]

log = logging.getLogger(__name__)

_DEVICES = "use 'cpu', 'cpu:N', a GPU index ('0', 'cuda:1') or several ('0,1', '0-3')"
NO_DEADLINE = math.inf  # offline frames and camera frames alike: the scheduler never drops them as late


class PredictError(RuntimeError):
    """The engine failed on a frame (the message names the source and the frame)."""


@dataclass(frozen=True)
class DeviceSpec:
    """One device to run on: its name in results, what the engine is loaded on, its share of the CPU cores."""

    name: str  # 'cpu', 'cpu:1', 'cuda:0'
    load_as: str  # 'cpu' or 'cuda:N'


def parse_device(device: str | int | Sequence[int | str] | None, backend: str) -> list[DeviceSpec]:
    """`device` -> the devices to run on (None: the first GPU the backend can use, else the CPU); ValueError if bad."""
    if device is None:
        return [DeviceSpec("cuda:0", "cuda:0")] if _gpu_usable(backend) else [DeviceSpec("cpu", "cpu")]
    if isinstance(device, int) and not isinstance(device, bool):
        parts = [str(device)]
    elif isinstance(device, str):
        parts = [p.strip() for p in device.lower().split(",") if p.strip()]
    elif isinstance(device, Sequence):
        parts = [str(d).strip().lower() for d in device]
    else:
        raise ValueError(f"device {device!r}: {_DEVICES}")
    if not parts:
        raise ValueError(f"device is empty: {_DEVICES}")
    if parts == ["cpu"]:
        return [DeviceSpec("cpu", "cpu")]
    if len(parts) == 1 and parts[0].startswith("cpu:"):
        n = parts[0][4:]
        if not n.isdigit() or not 1 <= int(n) <= 64:  # as yolov12-serve --gpus: 999 engines never finished loading
            raise ValueError(f"device {device!r}: 'cpu:N' takes N in 1..64 engines")
        return [DeviceSpec(f"cpu:{i}", "cpu") for i in range(int(n))]
    gpus: list[int] = []
    for p in parts:
        p = p.removeprefix("cuda:") if p != "cuda" else "0"
        lo, _, hi = p.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise ValueError(f"device {device!r}: {_DEVICES}")
        gpus.extend(range(int(lo), int(hi or lo) + 1))
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"device {device!r} names a GPU twice")
    return [DeviceSpec(f"cuda:{i}", f"cuda:{i}") for i in gpus]


def _gpu_usable(backend: str) -> bool:
    """Can this backend run on GPU 0 here? (ONNX Runtime: a CUDA provider and a GPU; PyTorch: CUDA; TensorRT: yes.)"""
    if backend == "tensorrt":
        return True
    if backend == "pytorch":
        import torch

        return torch.cuda.is_available()
    from ..devices import visible_gpus

    try:
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers() and bool(visible_gpus())
    except ImportError:
        return False


class _TimedEngine(Engine):
    """The engine as the worker sees it: the same runs, timed (for `Result.speed`), and padded up to an engine's
    smallest batch (a static batch-N export) so that any number of frames can run."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.device = inner.device
        self.instances = inner.instances
        self._local = threading.local()

    @property
    def info(self) -> EngineInfo:  # type: ignore[override] - read through: thresholds may be set per call
        info = self.inner.info
        return dataclasses.replace(info, batch=(1, info.batch[1])) if info.batch[0] > 1 else info

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        n, lo = len(batch), self.inner.info.batch[0]
        if n < lo:
            batch = np.concatenate([batch, np.zeros((lo - n, *batch.shape[1:]), np.uint8)])
        t0 = time.perf_counter()
        try:
            return self.inner.infer(batch)[:n]
        finally:
            self._local.run = (time.perf_counter() - t0, n)

    def last_run(self) -> tuple[float, int]:
        """(seconds, frames) of the latest run on the calling thread (the worker publishes from the thread that ran)."""
        return getattr(self._local, "run", (0.0, 1))


@dataclass
class _Device:
    """One device of one predict call: the server's scheduler and worker over the predictor's engine."""

    spec: DeviceSpec
    engine: _TimedEngine
    scheduler: DeadlineScheduler
    worker: DeviceWorker
    lanes: list[str]
    busy: set[str] = field(default_factory=set)


@dataclass
class _Pending:
    """What a frame in flight needs to become a Result."""

    source: str
    path: str
    index: int
    picture: Any
    time: float | None
    preprocess_s: float
    seq: int = -1  # offline: its place in reading order
    live: _LiveSink | None = None
    lane: str = ""


class _LiveSink:
    """The `FrameSink` a server source feeds (sources/base.py): plans the letterbox, offers frames newest-wins."""

    def __init__(self, run: _Run, item: Input, stream_id: str, device: _Device, vid_stride: int) -> None:
        self.run, self.item, self.stream_id, self.dev = run, item, stream_id, device
        self.device = device.spec.load_as  # read by the RTSP source to choose the decoder
        self.max_fps = 0.0  # every frame (newest-wins does the rest)
        self.vid_stride = vid_stride
        self.received = 0  # frames the source handed over
        self.untaken = 0  # results waiting for the caller (at most one: newest-wins)
        self.last_published = -1
        self.streamed = False
        self.reconnects = 0
        self.dropped = 0
        self.source: Any = None

    def admit(self, t: float) -> bool:
        return True  # every frame is offered: newest-wins at the caller's pace (offer_live) drops the rest

    def plan(self, src_hw: tuple[int, int]) -> Any:
        return self.run.planner.plan(src_hw)

    def put(self, image: Any, letterbox: Any, capture_time_us: int) -> None:
        self.run.offer_live(self, image, letterbox, capture_time_us)

    def set_state(self, state: Any, error: str = "") -> None:
        self.run.live_state(self, int(state), error)

    def count_reconnect(self) -> None:
        self.reconnects += 1

    def count_corrupt(self) -> None:
        """A skipped corrupt packet: the camera goes on (predict reports no per-packet figures)."""

    def note_decoder(self, decoder: str) -> None:
        """Where the camera decodes: said in the log already (predict shows no per-camera table)."""


def _mask(text: str, url: str) -> str:
    """`text` with `url` (FFmpeg quotes it in its errors) and its password masked."""
    from urllib.parse import urlsplit

    from ..config import redact_url

    text = text.replace(url, redact_url(url))
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    return text.replace(password, "***") if password else text


def _thresholds(info: EngineInfo, text: bool = False) -> Any:
    """What a host-NMS engine is run with, as a tuple or as words."""
    values = (info.conf, info.iou, info.max_det, tuple(info.imgsz))
    return values if not text else f"conf {info.conf}, iou {info.iou}, max_det {info.max_det}, imgsz {info.imgsz}"


@dataclass(frozen=True)
class PredictOptions:
    """One call's settings (validated by `Predictor.predict`)."""

    imgsz: tuple[int, int]
    conf: float | None
    iou: float | None
    classes: frozenset[int] | None
    max_det: int | None
    batch: int
    vid_stride: int
    window: int  # offline frames read and not yet handed over
    track: bool = False  # give each object a track id per source (tracking.py)
    engine_info: EngineInfo | None = None  # host-NMS engines: the thresholds set on them when the call starts


class Predictor:
    """Engines for one weights file on one or more devices; `predict(source, ...)` runs them (see the module docs).

    The engines stay loaded between calls (a script calling `predict` per frame pays for loading once);
    `close()` frees them, once the predict calls still running have ended. Calls may run inside one another
    (a second predict on crops while a stream=True generator is open); on engines that run NMS on the host
    (`.pt`, raw-head ONNX) those share the engines' thresholds, so they must ask for the same ones.
    """

    def __init__(self, weights: str | Path, device: str | int | Sequence[int | str] | None = None,
                 instances: int | None = None, half: bool = False, max_batch: int = 32) -> None:
        self.weights = Path(weights)
        self.backend = engines.BACKENDS.get(self.weights.suffix.lower())
        if self.backend is None:
            if self.weights.is_dir():
                raise EngineError(f"'{self.weights}' is a directory, not an engine file: give the engine file in it")
            raise EngineError(f"'{self.weights}': unknown engine format '{self.weights.suffix}': use .pt, .onnx or "
                              ".engine")
        self.devices = parse_device(device, self.backend)
        if instances is not None and not 1 <= instances <= MAX_INSTANCES:
            raise ValueError(f"instances must be 1..{MAX_INSTANCES} (each holds a copy of the engine), got {instances}")
        self.half = half
        self.engines: dict[str, Engine] = {}
        self._warned: set[str] = set()
        self._last_run: _Run | None = None
        self._running: list[_Run] = []  # calls started and not stopped: close() waits for them to end
        self._close_when_idle = False
        self._lock = threading.Lock()
        try:
            for spec in self.devices:
                self.engines[spec.name] = self._load(spec, instances, max_batch)
        except BaseException:
            self.close()
            raise
        self.info = next(iter(self.engines.values())).info  # as loaded: each call sets its thresholds from it
        self.names = dict(self.info.names)

    def _load(self, spec: DeviceSpec, instances: int | None, max_batch: int) -> Engine:
        cpu = spec.load_as == "cpu"
        opts: dict[str, Any] = {}
        if self.backend == "onnxruntime" and cpu:
            from engines.onnxruntime import available_cores

            # Two single-threaded sessions run 1.7x the frames of one two-threaded session on 2 cores
            # (bench/results/engines.md): offline frames keep both busy. cpu:N shares the cores out.
            cores = max(1, available_cores() // sum(d.load_as == "cpu" for d in self.devices))
            instances = instances or min(2, cores)
            opts["threads"] = max(1, cores // instances)
            # No fixed-shape sessions (ort_fixed.py): they are built by a daemon thread after 50 frames of a shape,
            # and a script that exits during that build aborts in ONNX Runtime ('terminate called', status 134).
            opts["fixed_after"] = 0
        elif self.backend == "pytorch":
            opts["max_batch"] = max_batch
            instances = instances or (1 if cpu else 2)  # torch's CPU thread pool is shared: one instance uses it all
        else:
            instances = instances or 2
        if self.half and (cpu or self.backend != "pytorch"):
            why = "the CPU runs fp32" if cpu else "this engine keeps its export's precision (yolov12-export --half)"
            self._warn_once("half", f"half=True: {why}")
        engine = engines.load(self.weights, device=spec.load_as, instances=instances, **opts)
        if self.backend == "pytorch" and not cpu and not self.half:
            self._warn_once("fp16", "the PyTorch engine runs fp16 on GPUs (half=False is not honoured)")
        return engine

    def _warn_once(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s: %s", self.weights.name, text)

    # ------------------------------------------------------------------------------------------------- calls
    def predict(self, source: Any, *, stream: bool = False, imgsz: int | Sequence[int] | None = None,
                conf: float | None = None, iou: float | None = None,
                classes: int | str | Sequence[int | str] | None = None,
                max_det: int | None = None, batch: int = 1, vid_stride: int = 1,
                window: int | None = None, track: bool = False) -> Iterator[Result] | list[Result]:
        """Detections for every frame of `source` (see `resolve_sources`): a generator when `stream`, else a list.
        `track`: follow each object through the frames of its source (`Boxes.id`, as the server's AddStream track;
        an object starts from a detection scoring 0.5, the server's default --track-min-score).

        Sources are checked at once (SourceError names a bad one); a camera is found unreachable when the
        generator first runs. `window`: frames read ahead of the caller (default: 4 per lane).
        """
        self._check_open()
        sources = resolve_sources(source)
        if not stream and sources.live:
            raise ValueError(f"{sources.live[0].name} is a live camera: its results never end; use stream=True and "
                             "stop when you have what you need")
        opts = dataclasses.replace(self._options(imgsz, conf, iou, classes, max_det, batch, vid_stride, window),
                                   track=bool(track))
        if not stream and any(i.kind == "video" for i in sources.inputs):
            log.info("predict(stream=False) on a video keeps every frame's result (and its frame) in memory; "
                     "stream=True keeps a few")
        gen = self._generate(sources, opts)
        return gen if stream else list(gen)

    __call__ = predict

    def _generate(self, sources: Sources, opts: PredictOptions) -> Iterator[Result]:
        run = _Run(self, sources, opts)
        self._last_run = run
        try:
            run.start()
            yield from run.results()
        finally:
            run.stop()

    @property
    def stats(self) -> dict[str, int]:
        """Counts of the latest call: frames read, results given, camera frames dropped (superseded or while the
        caller had `window` results of that camera to take), camera reconnects."""
        run = self._last_run
        if run is None:
            return {}
        return {"read": run.read, "results": run.yielded, "dropped": sum(s.dropped for s in run.sinks),
                "reconnects": sum(s.reconnects for s in run.sinks)}

    def _class_ids(self, classes: Any) -> frozenset[int]:
        """`classes` (ids or names, one or a list) as the model's class ids; ValueError listing them otherwise."""
        info = self.info
        listed = f"0..{info.nc - 1}: {', '.join(info.names.values())}"
        items = [classes] if isinstance(classes, str | int | np.integer) else classes
        by_name = {name: i for i, name in info.names.items()}
        ids = []
        for c in items:
            if isinstance(c, str) and c in by_name:
                ids.append(by_name[c])
            elif isinstance(c, int | np.integer) and not isinstance(c, bool) and int(c) in info.names:
                ids.append(int(c))
            else:
                raise ValueError(f"classes: {c!r} is not a class of this model (give ids or names: {listed})")
        return frozenset(ids)

    def _options(self, imgsz: Any, conf: float | None, iou: float | None, classes: Any, max_det: int | None,
                 batch: int, vid_stride: int, window: int | None) -> PredictOptions:
        info = self.info
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
        if isinstance(vid_stride, bool) or not isinstance(vid_stride, int) or vid_stride < 1:
            raise ValueError(f"vid_stride must be an integer >= 1, got {vid_stride!r}")
        for name, value in (("conf", conf), ("iou", iou)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float | np.floating)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if conf is not None and not 0 <= conf < 1:
            raise ValueError(f"conf must be within [0, 1), got {conf}")
        if iou is not None and not 0 < iou <= 1:
            raise ValueError(f"iou must be within (0, 1], got {iou}")
        if max_det is not None and (isinstance(max_det, bool) or not isinstance(max_det, int | np.integer)
                                    or max_det < 1):
            raise ValueError(f"max_det must be an integer >= 1, got {max_det!r}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if batch > info.batch[1]:
            self._warn_once(f"batch{batch}", f"batch {batch} is more than the engine takes ({info.batch[1]}): "
                                             f"running batches of {info.batch[1]}")
            batch = info.batch[1]
        hw = self._imgsz(imgsz)
        if classes is not None:
            classes = self._class_ids(classes)
        host_nms = self.backend == "pytorch" or info.extra.get("layout") == "raw"
        engine_info = None
        if host_nms:  # the backend runs NMS with the engine's thresholds: set for this call when it starts
            engine_info = dataclasses.replace(info, conf=info.conf if conf is None else conf,
                                              iou=info.iou if iou is None else iou,
                                              max_det=info.max_det if max_det is None else max_det,
                                              imgsz=self._reach(hw))
        else:
            if conf is not None and conf < info.conf:
                self._warn_once(f"conf{conf}", f"conf {conf}: this engine drops scores <= {info.conf} inside its graph "
                                               f"(export again with --conf {conf} to see them)")
            if iou is not None and abs(iou - info.iou) > 1e-6:
                self._warn_once(f"iou{iou}", f"iou {iou}: this engine's NMS runs inside its graph at IoU {info.iou} "
                                             f"(export again with --iou {iou})")
            if max_det is not None and max_det > info.max_det:
                self._warn_once(f"max_det{max_det}", f"max_det {max_det}: this engine keeps at most {info.max_det} "
                                                     f"detections per frame inside its graph (export again with "
                                                     f"--max-det {max_det} to get more)")
        lanes = self._lanes_per_device(batch) * len(self.devices)
        host_conf = conf if conf is not None and not host_nms and conf > info.conf else None  # else the engine's
        return PredictOptions(hw, host_conf, iou, classes, max_det, batch, vid_stride, window or 4 * lanes,
                              engine_info=engine_info)

    def _begin(self, run: _Run) -> None:
        """A call starts: set its thresholds on the engines, unless a running call needs others (ValueError)."""
        with self._lock:
            self._check_open()
            new = run.opts.engine_info
            if new is not None:
                for other in self._running:
                    old = other.opts.engine_info
                    if old is not None and _thresholds(old) != _thresholds(new):
                        raise ValueError(
                            f"this predict call asks for {_thresholds(new, text=True)} while an earlier one still "
                            f"running asks for {_thresholds(old, text=True)}: {self.weights.name} runs NMS on the "
                            "host with one setting at a time; ask for the same, or finish (or close()) the first")
                for e in self.engines.values():
                    e.info = new
            self._running.append(run)

    def _check_open(self) -> None:
        if not self.engines or self._close_when_idle:
            raise PredictError(f"{self.weights.name}: this predictor was closed: make a new one")

    def _end(self, run: _Run) -> None:
        """A call stopped: free the engines if close() was asked for while it ran."""
        with self._lock:
            if run in self._running:
                self._running.remove(run)
            close = self._close_when_idle and not self._running
        if close:
            self._close_engines()

    def _imgsz(self, imgsz: Any) -> tuple[int, int]:
        """The largest engine input (h, w) of this call: stride multiples (rounded up), within what the engine takes."""
        info = self.info
        if imgsz is None:
            return info.imgsz
        if isinstance(imgsz, int) and not isinstance(imgsz, bool):
            h = w = imgsz
        elif isinstance(imgsz, Sequence) and len(imgsz) == 2 and all(isinstance(v, int) for v in imgsz):
            h, w = imgsz
        else:
            raise ValueError(f"imgsz must be an integer or (height, width), got {imgsz!r}")
        if h < 1 or w < 1:
            raise ValueError(f"imgsz must be positive, got {imgsz!r}")
        s = info.stride
        hw = (-(-h // s) * s, -(-w // s) * s)
        if hw != (h, w):
            self._warn_once(f"imgsz{h}x{w}", f"imgsz {h}x{w} rounded up to {hw[0]}x{hw[1]} (stride {s} multiples)")
        if not info.dynamic_hw and hw != info.imgsz:
            raise ValueError(f"imgsz {hw[0]}x{hw[1]}: this engine was exported for {info.imgsz[0]}x{info.imgsz[1]} "
                             "only (export with --dynamic to run other sizes)")
        if self.backend != "pytorch" and (hw[0] > info.imgsz[0] or hw[1] > info.imgsz[1]):
            raise ValueError(f"imgsz {hw[0]}x{hw[1]}: this engine takes at most {info.imgsz[0]}x{info.imgsz[1]} "
                             f"(export with --imgsz {max(hw)} for larger inputs)")
        return hw

    def _reach(self, hw: tuple[int, int]) -> tuple[int, int]:
        """A .pt engine runs any size (the model is convolutional): its largest input becomes this call's."""
        return hw if self.backend == "pytorch" else self.info.imgsz

    def _instances(self) -> int:
        return next(iter(self.engines.values())).instances

    def _lanes_per_device(self, batch: int) -> int:
        return batch * (self._instances() + 1)  # a batch per instance running, and one ready

    def close(self) -> None:
        """Free the engines: now, or when the predict calls still running end (a stream=True generator left open
        keeps them until it is read to its end, closed, or dropped)."""
        with self._lock:
            self._close_when_idle = bool(self._running)
            if self._close_when_idle:
                return
        self._close_engines()

    def _close_engines(self) -> None:
        for e in self.engines.values():
            e.close()
        self.engines = {}

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_RUNNING: weakref.WeakSet[_Run] = weakref.WeakSet()  # predict calls started and not stopped


@atexit.register
def _stop_running() -> None:
    """A stream=True generator left half-read when the script ends: stop its threads before the interpreter goes
    (its workers, still inside the engine while modules were torn down, aborted the process: SIGABRT)."""
    for run in list(_RUNNING):
        run.stop()


class _Run:
    """One predict call: devices started, the offline reader, the cameras, and results in order (module docs)."""

    def __init__(self, predictor: Predictor, sources: Sources, opts: PredictOptions) -> None:
        self.p, self.sources, self.opts = predictor, sources, opts
        info = predictor.info
        # within the shapes the engine was built or prepared for (a TensorRT engine's profiles), as the server plans;
        # a .pt engine's CUDA graphs are listed for its training size: at another imgsz, this call's own shapes (they
        # are captured at start), else every frame would be fitted into the training size whatever imgsz asks
        shapes = info.plan_shapes
        if shapes is not None and predictor.backend == "pytorch" and tuple(opts.imgsz) != tuple(info.imgsz):
            shapes = aspect_shapes(opts.imgsz, info.stride)
        self.planner = InputPlanner(opts.imgsz, info.stride, info.dynamic_hw, shapes)
        self.names = dict(info.names)
        self.cond = threading.Condition()
        self.devices: list[_Device] = []
        self.sinks: list[_LiveSink] = []
        self.inflight: dict[tuple[str, int], _Pending] = {}
        self.done: dict[int, Result | BaseException] = {}  # offline results (or errors) by reading order
        self.live_results: deque[tuple[_LiveSink, Result]] = deque()
        self.next_seq = 0  # the next offline result to hand over
        self.read = 0  # offline frames read so far (their sequence numbers are 0..read-1)
        self.read_error: tuple[int, BaseException] | None = None  # the reader stopped here with this error
        self.reader_done = False
        self.fatal: BaseException | None = None  # a camera error, raised at once
        self.yielded = 0
        self.trackers: dict[str, Tracker] = {}  # per source, with opts.track
        # a camera result's monotonic ingest time, for its tracker: its `time` is the wall clock, which NTP may step
        self.clocks: weakref.WeakKeyDictionary[Result, float] = weakref.WeakKeyDictionary()
        self.stopping = False
        self._reader: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self.p._begin(self)
        _RUNNING.add(self)
        lanes = self.p._lanes_per_device(self.opts.batch)
        shapes = plannable_shapes(self.planner)
        for spec in self.p.devices:
            self.p.engines[spec.name].prepare(shapes, self.opts.batch)  # CUDA graphs now, not while predicting
            engine = _TimedEngine(self.p.engines[spec.name])
            scheduler = DeadlineScheduler(RunTimeModel(), max_batch=self.opts.batch, process_late=True)
            worker = DeviceWorker(spec.name, engine, scheduler, self._publish, threads=engine.instances)
            ids = [f"{spec.name}/lane{k}" for k in range(lanes)] if self.sources.offline else []
            for lane in ids:
                scheduler.add_stream(lane, capacity=1)
            self.devices.append(_Device(spec, engine, scheduler, worker, ids))
            worker.start()
        if self.sources.offline:
            self._reader = threading.Thread(target=self._read, name="predict-reader", daemon=True)
            self._reader.start()
        else:
            self.reader_done = True
        self._start_cameras()

    def _start_cameras(self) -> None:
        from ..config import RtspOptions
        from ..sources import make_source

        if self.sources.live:
            logging.getLogger("yolov12_serve.sources.rtsp").addFilter(self._quiet)

        seen: dict[str, int] = {}
        for k, item in enumerate(self.sources.live):
            dev = self.devices[k % len(self.devices)]
            n = seen[item.name] = seen.get(item.name, 0) + 1
            stream_id = item.name if n == 1 else f"{item.name}#{n}"  # the same camera twice: two streams
            sink = _LiveSink(self, item, stream_id, dev, self.opts.vid_stride)
            dev.scheduler.add_stream(stream_id, capacity=1)
            kind = "synthetic" if item.url.lower().startswith("synthetic://") else "rtsp"
            sink.source = make_source(kind, sink, item.url, RtspOptions())
            self.sinks.append(sink)
            sink.source.start()

    def _quiet(self, record: logging.LogRecord) -> bool:
        """Log filter: a camera's first failed connection is our one error, not also the source's warning."""
        args = record.args if isinstance(record.args, tuple) else ()
        return not any(args[:1] == (s.stream_id,) and not s.streamed for s in self.sinks)

    def stop(self) -> None:
        _RUNNING.discard(self)
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.sources.live:
            logging.getLogger("yolov12_serve.sources.rtsp").removeFilter(self._quiet)
        for sink in self.sinks:
            if sink.source is not None:
                sink.source.stop()
        for dev in self.devices:
            dev.worker.stop(timeout=5.0)
        if self._reader is not None:
            self._reader.join(5.0)
        self.p._end(self)

    # ------------------------------------------------------------------------------------------------- offline
    def _read(self) -> None:
        """The reader thread: every offline frame in order, onto a free lane, while the window allows."""
        frames = read_offline(self.sources.offline, self.planner.plan, self.opts.vid_stride)
        try:
            for decoded in frames:
                if not self._offer(decoded):
                    return
        except Exception as e:  # a bad file: the results before it are still handed over, then this error
            log.debug("reader stopped", exc_info=True)
            with self.cond:
                self.read_error = (self.read, e if isinstance(e, SourceError) else
                                   PredictError(f"reading stopped after {self.read} frames: {type(e).__name__}: {e}"))
                self.cond.notify_all()
        finally:
            frames.close()
            with self.cond:
                self.reader_done = True
                self.cond.notify_all()

    def _offer(self, d: Decoded) -> bool:
        """Wait for room (the window, a free lane), then hand `d` to that lane's scheduler; False once stopping."""
        with self.cond:
            while True:
                if self.stopping:
                    return False
                if self.read - self.next_seq < self.opts.window:
                    lane_dev = self._free_lane()
                    if lane_dev is not None:
                        break
                self.cond.wait()
            lane, dev = lane_dev
            seq = self.read
            self.read += 1
            dev.busy.add(lane)
            self.inflight[(lane, seq)] = _Pending(d.source, d.path, d.index, d.picture, d.time, d.preprocess_s,
                                                  seq=seq, lane=lane)
        t = now()
        frame = Frame(stream_id=lane, frame_id=seq, input=d.input, letterbox=d.letterbox,
                      capture_time_us=time.time_ns() // 1000, ingest_time=t, deadline=NO_DEADLINE, droppable=False)
        if dev.scheduler.submit(frame) is not None:  # cannot happen: a lane holds one frame at a time
            raise RuntimeError(f"lane {lane} refused frame {seq}")
        return True

    def _free_lane(self) -> tuple[str, _Device] | None:
        """A lane with no frame, on the device with the fewest frames in flight."""
        best = None
        for dev in self.devices:
            if len(dev.busy) < len(dev.lanes) and (best is None or len(dev.busy) < len(best.busy)):
                best = dev
        if best is None:
            return None
        return next(lane for lane in best.lanes if lane not in best.busy), best

    # ------------------------------------------------------------------------------------------------- cameras
    def offer_live(self, sink: _LiveSink, image: Any, letterbox: Any, capture_time_us: int) -> None:
        """A camera's frame (from its source thread), offered newest-wins."""
        index = sink.received
        sink.received += 1
        if index % sink.vid_stride:
            return
        with self.cond:
            if self.stopping:
                return
            pending = _Pending(sink.item.name, sink.item.name, index, None, capture_time_us / 1e6, 0.0, live=sink)
            self.inflight[(sink.stream_id, index)] = pending
        if callable(image):
            pending.picture = source_picture(image)
            prepare = image

            def timed(out: np.ndarray | None = None) -> np.ndarray:  # the letterbox runs in the worker: time it
                t0 = time.perf_counter()
                try:
                    return prepare() if out is None else prepare(out=out)
                finally:
                    pending.preprocess_s += time.perf_counter() - t0

            frame_input, deferred = None, timed
        else:
            frame_input, deferred = image, None
        t = now()
        frame = Frame(stream_id=sink.stream_id, frame_id=index, input=frame_input, letterbox=letterbox,
                      capture_time_us=capture_time_us, ingest_time=t, deadline=NO_DEADLINE, droppable=True,
                      prepare=deferred)
        old = sink.dev.scheduler.submit(frame)
        if old is not None:  # superseded in the mailbox (or the stream is gone): never answered
            with self.cond:
                if self.inflight.pop((old.stream_id, old.frame_id), None) is not None:
                    sink.dropped += 1

    def live_state(self, sink: _LiveSink, state: int, error: str) -> None:
        from ..sources import StreamState

        if self.stopping:
            return
        if state == StreamState.STREAMING:
            sink.streamed = True
            return
        if state == StreamState.FAILED or (state == StreamState.RECONNECTING and not sink.streamed):
            why = _mask(error or "it stopped", sink.item.url)
            with self.cond:
                if self.fatal is None and not self.stopping:
                    self.fatal = SourceError(f"{sink.item.name}: {'cannot connect' if not sink.streamed else 'failed'}"
                                             f": {why}")
                self.cond.notify_all()
            if sink.source is not None:
                sink.source.stop()

    # ------------------------------------------------------------------------------------------------- results
    def _publish(self, fr: FrameResult) -> None:
        """The worker's callback, on the thread that ran the batch: the FrameResult becomes a Result."""
        try:
            self._to_result(fr)
        except Exception as e:  # a bug here must reach the caller, not end a worker thread with the caller waiting
            log.exception("predict: publishing %s frame %d failed", fr.stream_id, fr.frame_id)
            with self.cond:
                self.fatal = self.fatal or PredictError(f"publishing a result failed: {type(e).__name__}: {e}")
                self.cond.notify_all()

    def _to_result(self, fr: FrameResult) -> None:
        t0 = time.perf_counter()
        with self.cond:
            pending = self.inflight.pop((fr.stream_id, fr.frame_id), None)
        if pending is None:
            return
        dev = next(d for d in self.devices if d.spec.name == fr.device)
        seconds, n = dev.engine.last_run()
        item: Result | BaseException
        if fr.error:
            item = PredictError(f"{pending.source} frame {pending.index}: {fr.error}")
        else:
            item = Result(Boxes(self._filter(fr.detections), fr.src_hw), self.names, pending.source, pending.path,
                          pending.index, fr.src_hw, {}, fr.device, pending.time, pending.picture)
            item.speed.update(preprocess=pending.preprocess_s * 1e3, inference=seconds / max(n, 1) * 1e3,
                              postprocess=(time.perf_counter() - t0) * 1e3, batch=float(n))
        with self.cond:
            if pending.live is None:
                self.done[pending.seq] = item
                dev.busy.discard(pending.lane)
            else:
                sink = pending.live
                if isinstance(item, BaseException):
                    self.fatal = self.fatal or item
                elif pending.index < sink.last_published:  # a newer frame of the camera was answered first
                    sink.dropped += 1
                else:
                    sink.last_published = pending.index
                    if sink.untaken:  # the caller has not taken the camera's previous result: the newest wins
                        stale = next(k for k, (s, _) in enumerate(self.live_results) if s is sink)
                        del self.live_results[stale]
                        sink.dropped += 1
                    else:
                        sink.untaken = 1
                    self.live_results.append((sink, item))
                    self.clocks[item] = fr.ingest_time or now()
            self.cond.notify_all()

    def _filter(self, dets: np.ndarray) -> np.ndarray:
        o = self.opts
        if o.conf is not None and len(dets):
            dets = dets[dets[:, 4] > o.conf]
        if o.classes is not None and len(dets):
            dets = dets[np.isin(dets[:, 5].astype(np.int64), list(o.classes))]
        if o.max_det is not None and len(dets) > o.max_det:
            dets = dets[np.argsort(-dets[:, 4], kind="stable")[:o.max_det]]
        return dets

    def results(self) -> Iterator[Result]:
        """Offline results in reading order and camera results as they come; raises the first error in its place."""
        while True:
            with self.cond:
                while True:
                    if self.fatal is not None:
                        raise self.fatal
                    item = self.done.pop(self.next_seq, None)
                    if item is not None:
                        self.next_seq += 1
                        self.cond.notify_all()  # the window moved
                        break
                    if self.read_error is not None and self.read_error[0] == self.next_seq:
                        raise self.read_error[1]
                    if self.live_results:
                        sink, item = self.live_results.popleft()
                        sink.untaken = 0
                        break
                    if self.reader_done and self.next_seq == self.read and self.read_error is None and not self.sinks:
                        return
                    self.cond.wait()
            if isinstance(item, BaseException):
                raise item
            if self.opts.track:
                self._track(item)
            self.yielded += 1
            yield item

    def _track(self, result: Result) -> None:
        """Its boxes' track ids: one tracker per source, fed in the source's frame order (results() order), at the
        frame's time (a video's position; a camera's monotonic ingest time, so a wall-clock step neither forgets
        its tracks nor keeps stale ones; images: 30 a second)."""
        tracker = self.trackers.setdefault(result.source, Tracker())
        t = self.clocks.pop(result, None)
        if t is None:
            t = result.time if result.time is not None else result.frame / 30.0
        result.boxes.id, _ = tracker.update(result.boxes.data, t, result.boxes.orig_shape)
