"""The server core: loads an engine per device, keeps the stream registry, places streams, publishes results.

Everything the API does goes through here (`add_stream`, `remove_stream`, `list_streams`, `open_push`,
`open_image`, `server_info`, `drain`); the core owns one `DeviceRuntime` per device (engine, input
planner, scheduler, worker) and the results fan-out. Threads: one per pulled source, K per device
worker, one watchdog; the API's asyncio loop only reads fan-out subscriptions.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.base import Engine, EngineInfo
from engines.letterbox import fit_shape

from . import __version__, priority
from .config import ServerConfig, StreamSpec, redact_url, url_kind, validate_stream_id
from .costmodel import RunTimeModel
from .errors import (
    ConfigError,
    InvalidArgumentError,
    ResourceExhaustedError,
    StreamExistsError,
    StreamNotFoundError,
    UnavailableError,
    WrongShardError,
)
from .fanout import Fanout
from .frames import Frame, FrameResult, now
from .metrics import LiveSnapshot, Metrics
from .placement import Placement
from .preprocess import InputPlanner
from .scheduler import DeadlineScheduler
from .sources import StreamState, make_source
from .sources.push import decode_frame
from .stream import Stream, StreamView
from .worker import DeviceWorker

__all__ = ["DeviceRuntime", "EngineLoader", "ServerCore", "ServerInfoView"]

log = logging.getLogger(__name__)

EngineLoader = Callable[..., Engine]  # (path, device=..., instances=..., **opts) -> Engine
IMAGE_LABEL = "_image"  # the metrics label shared by all one-off DetectImage frames
RECHECK_S = 10.0  # how often a failed engine is tried again


@dataclass
class DeviceRuntime:
    """Everything that serves one device: its engine, input planner, cost model, scheduler and worker."""

    name: str
    engine_path: str
    engine: Engine
    planner: InputPlanner
    cost: RunTimeModel
    scheduler: DeadlineScheduler
    worker: DeviceWorker
    max_batch: int


@dataclass(frozen=True)
class ServerInfoView:
    """What GetServerInfo reports."""

    version: str
    engines: list[tuple[str, str, EngineInfo, int]]  # (path, device, info, instances)
    devices: list[str]
    class_names: list[str]
    input_hw: tuple[int, int]
    slo_ms: float
    max_batch: int
    max_streams: int
    process_late: bool


def _default_loader(path: str, device: str = "cpu", instances: int = 1, **opts) -> Engine:
    import engines

    return engines.load(path, device=device, instances=instances, **opts)


class ServerCore:
    """Engines per device, stream registry, placement, watchdog and fan-out; thread-safe."""

    def __init__(self, config: ServerConfig, load_engine: EngineLoader | None = None) -> None:
        self.config = config
        self._load_engine = load_engine or _default_loader
        self.runtimes: dict[str, DeviceRuntime] = {}
        self.placement = Placement()
        self.metrics: Metrics | None = None
        self.fanout = Fanout(on_overflow=self._on_subscriber_overflow)
        self._streams: dict[str, Stream] = {}
        self._private: dict[str, Stream] = {}
        self._lock = threading.RLock()
        self._image_ids = itertools.count()
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._failed: set[str] = set()  # devices whose engine keeps failing
        self.ready = False
        self.draining = False
        self.on_health_change: Callable[[bool], None] = lambda serving: None

    # ----------------------------------------------------------------------------------------- start / stop
    def start(self) -> None:
        """Load and warm up one engine per device, start the workers and the watchdog (blocking, seconds)."""
        cfg = self.config
        paths = cfg.engines
        if not paths:
            raise ConfigError("no engine given: pass --engines model.onnx (or --demo for the bundled model)")
        if len(paths) not in (1, len(cfg.devices)):
            raise ConfigError(f"--engines lists {len(paths)} files for {len(cfg.devices)} devices: give one file "
                              "for all devices or one per device")
        for p in paths:
            if not Path(p).is_file():
                raise ConfigError(f"engine file not found: {p}")
        self.metrics = Metrics(cfg.slo_s, cfg.devices, cfg.max_batch, snapshot=self.live_snapshot)
        for i, device in enumerate(cfg.devices):
            path = paths[i] if len(paths) > 1 else paths[0]
            self.runtimes[device] = self._start_device(device, path)
        self._watchdog = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._watchdog.start()
        self.ready = True
        self.on_health_change(True)

    def _start_device(self, device: str, path: str) -> DeviceRuntime:
        cfg = self.config
        # CPU threads per instance is an ONNX Runtime setting; the other backends size themselves
        opts = {"threads": cfg.threads} if cfg.threads and path.lower().endswith(".onnx") else {}
        before = priority.native_threads()
        engine = self._load_engine(path, device=device, instances=cfg.instances, **opts)
        priority.favour(priority.native_threads() - before)  # its intra-op pools run inference too
        info = engine.info
        planner = InputPlanner(info.imgsz, info.stride, info.dynamic_hw)
        max_batch = max(1, min(cfg.max_batch, info.batch[1]))
        cost = RunTimeModel()
        frame_cost = self._warm_up(engine, planner, cost, max_batch, cfg.instances)
        camera = fit_shape((360, 640), planner.imgsz, planner.stride, rect=planner.dynamic_hw)
        if cost.predict(1, camera, 0.5) > cfg.slo_s:
            log.warning("%s: one frame takes %.0f ms, more than the %.0f ms SLO: every frame will miss it; raise "
                        "--slo-ms, or use a smaller / faster engine (or a quieter machine)", device,
                        cost.predict(1, camera, 0.5) * 1000, cfg.slo_ms)
        scheduler = DeadlineScheduler(cost, max_batch, cfg.process_late, on_drop=self._drop)
        worker = DeviceWorker(device, engine, scheduler, self._publish, threads=cfg.instances,
                              on_batch=self._on_batch, on_failure=self._on_engine_failure)
        self.placement.add_device(device, cfg.instances, frame_cost)
        worker.start()
        log.info("%s: %s (%s, input %s, batch <= %d, %d instances)", device, path, info.precision, info.imgsz,
                 max_batch, cfg.instances)
        return DeviceRuntime(device, path, engine, planner, cost, scheduler, worker, max_batch)

    @staticmethod
    def _warm_up(engine: Engine, planner: InputPlanner, cost: RunTimeModel, max_batch: int, instances: int) -> float:
        """Seed the cost model: batch 1 at the full input, batches 1, 2, 4 .. max_batch at a 16:9 camera's shape
        (how much batching pays on this device), and those again on all instances at once (how much they slow
        each other down); returns seconds per frame at the full input."""
        camera = fit_shape((360, 640), planner.imgsz, planner.stride, rect=planner.dynamic_hw)
        sizes = sorted({1, max_batch, *(2**i for i in range(8) if 2**i < max_batch)})
        runs = [(planner.imgsz, 1)] + [(camera, n) for n in sizes]
        full = 0.0
        for shape, n in runs:
            x = np.full((n, *shape, 3), 114, np.uint8)
            for _ in range(instances):  # each instance's first run of a shape (allocations, kernel selection, a
                engine.infer(x)  # CUDA graph capture) stays out of the timed run, which borrows the first again
            t0 = now()
            engine.infer(x)
            dt = now() - t0
            cost.observe(n, shape, dt)
            if (shape, n) == (planner.imgsz, 1):
                full = dt
        for n in sizes if instances > 1 else ():
            x = np.full((n, *camera, 3), 114, np.uint8)
            times: list[float] = []

            def run(x: np.ndarray = x, times: list[float] = times) -> None:
                t0 = now()
                engine.infer(x)
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

    def drain(self, timeout: float = 5.0) -> None:
        """Stop taking work, stop the sources, let frames in flight finish (up to `timeout`), stop the workers."""
        with self._lock:
            if self.draining:
                return
            self.draining = True
            streams = list(self._streams.values())
        self.on_health_change(False)
        for s in streams:
            if s.source is not None:
                s.source.stop()
        end = now() + timeout
        while now() < end and any(rt.scheduler.stats().in_flight for rt in self.runtimes.values()):
            self._stop.wait(0.02)
        self._stop.set()
        for rt in self.runtimes.values():
            rt.worker.stop(max(0.1, end - now()))
        self.fanout.close_all()
        for s in streams:
            s.close()
        for rt in self.runtimes.values():
            rt.engine.close()
        if self.metrics is not None:
            self.metrics.stop()

    # ----------------------------------------------------------------------------------------- streams
    def add_stream(self, spec: StreamSpec) -> StreamView:
        """Validate, register and start pulling a camera; returns at once (state CONNECTING)."""
        validate_stream_id(spec.stream_id)
        self.check_owner(spec.stream_id)
        kind = url_kind(spec.url, self.config.allow_files)
        self.config.camera_policy.check(spec.url, kind)  # scheme and host allowed? (allowlist.py)
        if spec.max_fps < 0:
            raise InvalidArgumentError(f"max_fps must be >= 0 (0: every frame), got {spec.max_fps}")
        stream = self._register(spec.stream_id, redact_url(spec.url), kind, spec.max_fps, droppable=True)
        try:
            stream.source = make_source(kind, stream, spec.url, self.config.rtsp)
        except Exception:
            self._unregister(stream, "removed")
            raise
        stream.source.start()
        log.info("stream %s added (%s) on %s", stream.stream_id, stream.url, stream.device)
        return stream.view()

    def open_push(self, stream_id: str) -> Stream:
        """Register a stream fed by a Detect call (listed as push://, never dropped as late: the client paces it)."""
        validate_stream_id(stream_id)
        stream = self._register(stream_id, "push://", "push", 0.0, droppable=False)
        stream.set_state(StreamState.STREAMING)
        return stream

    def open_image(self) -> Stream:
        """A private one-off stream for DetectImage (not listed, not watched, metrics under one shared label)."""
        self._check_serving()
        sid = f"\x00image-{next(self._image_ids)}"
        stream = Stream(sid, "image://", "image", 0.0, self.config.slo_s, self._on_ingest, self._drop,
                        self._on_reconnect, droppable=False, public=False, metrics_label=IMAGE_LABEL)
        with self._lock:
            stream.bind(self.runtimes[self.placement.assign(sid)])
            self._private[sid] = stream
        return stream

    def close_stream(self, stream: Stream) -> StreamView:
        """End a push or image stream (the call that fed it is over); a no-op if it was removed meanwhile."""
        with self._lock:
            if stream.public:
                mine = self._streams.get(stream.stream_id) is stream
            else:
                mine = self._private.pop(stream.stream_id, None) is stream
        if mine and stream.public:
            self._unregister(stream, "removed")
        elif mine:
            self._unbind(stream, "removed")
        return stream.view()

    def ingest_encoded(self, stream: Stream, data: bytes, encoding: int, width: int, height: int, frame_id: int,
                       capture_time_us: int, received_at: float) -> Frame | None:
        """Decode and letterbox a pushed frame (call from a worker thread), then hand it to the scheduler."""
        image, lb = decode_frame(data, encoding, width, height, stream.plan)
        return stream.put(image, lb, capture_time_us, frame_id=frame_id, ingest_time=received_at)

    def _check_serving(self) -> None:
        if self.draining:
            raise UnavailableError("the server is shutting down")
        if not self.ready:
            raise UnavailableError("the server is still loading its engines; retry in a moment")

    def _register(self, stream_id: str, url: str, kind: str, max_fps: float, droppable: bool) -> Stream:
        self._check_serving()
        with self._lock:
            if stream_id in self._streams:
                raise StreamExistsError(f"stream {stream_id!r} already exists: remove it first or pick another id")
            if len(self._streams) >= self.config.max_streams:
                raise ResourceExhaustedError(f"stream limit reached ({self.config.max_streams}): remove a stream "
                                             "or start the server with a larger --max-streams")
            stream = Stream(stream_id, url, kind, max_fps, self.config.slo_s, self._on_ingest, self._drop,
                            self._on_reconnect, droppable=droppable)
            device = self.placement.assign(stream_id, max_fps)
            stream.bind(self.runtimes[device])
            self._streams[stream_id] = stream
        if self.metrics is not None:
            self.metrics.add_stream(stream_id)
        return stream

    def remove_stream(self, stream_id: str) -> StreamView:
        """Stop a stream and free what it held; NOT_FOUND if it is unknown."""
        with self._lock:
            stream = self._streams.pop(stream_id, None)
        if stream is None:
            self.check_owner(stream_id)  # another replica's camera: say which
            raise StreamNotFoundError(f"no stream {stream_id!r} (ListStreams shows the registered ids)")
        self._unregister(stream, "removed")
        log.info("stream %s removed", stream_id)
        return stream.view()

    def _unregister(self, stream: Stream, reason: str) -> None:
        with self._lock:
            self._streams.pop(stream.stream_id, None)
        if stream.source is not None:
            stream.source.stop()
        self._unbind(stream, reason)
        self.placement.release(stream.stream_id)
        if self.metrics is not None:
            self.metrics.forget_stream(stream.stream_id)

    def _unbind(self, stream: Stream, reason: str) -> None:
        stream.close()
        if stream.runtime is not None:
            for pending in stream.runtime.scheduler.remove_stream(stream.stream_id):
                self._drop(pending, reason)
        if not stream.public:
            self.placement.release(stream.stream_id)

    def check_owner(self, stream_id: str) -> None:
        """WrongShardError naming the owner when another replica serves `stream_id` (--shard-count > 1)."""
        shard = self.config.shard
        if not shard.owns(stream_id):
            owner = shard.owner(stream_id)
            raise WrongShardError(f"stream {stream_id!r} belongs to shard {owner} of {shard.count}, not to this "
                                  f"server (shard {shard.index}): send it to replica {owner} (the Python client's "
                                  "ShardedClient routes by itself)", owner)

    def get_stream(self, stream_id: str) -> Stream:
        """The registered stream, or StreamNotFoundError."""
        with self._lock:
            stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamNotFoundError(f"no stream {stream_id!r} (ListStreams shows the registered ids)")
        return stream

    def list_streams(self) -> list[StreamView]:
        """Snapshots of all registered streams, by id."""
        with self._lock:
            streams = sorted(self._streams.values(), key=lambda s: s.stream_id)
        return [s.view() for s in streams]

    def streams(self) -> list[Stream]:
        """The registered streams, by id (live objects: for the status summary)."""
        with self._lock:
            return sorted(self._streams.values(), key=lambda s: s.stream_id)

    def has_stream(self, stream_id: str) -> bool:
        """True when a stream with this id is registered."""
        with self._lock:
            return stream_id in self._streams

    # ----------------------------------------------------------------------------------------- pipeline hooks
    def _on_ingest(self, stream: Stream) -> None:
        if self.metrics is not None and self._lookup(stream.stream_id) is stream:  # not after its removal
            self.metrics.series(stream.metrics_label, stream.device).frames.inc()

    def _drop(self, frame: Frame, reason: str) -> None:
        stream = self._lookup(frame.stream_id)
        if stream is None:
            return  # removed meanwhile: its series are gone too
        self._count_drop(stream, reason)
        if not frame.droppable:  # a push or DetectImage caller waits for this frame: answer it with the reason
            self.fanout.publish(FrameResult(frame.stream_id, frame.frame_id, np.zeros((0, 6), np.float32),
                                            frame.letterbox.src_hw, frame.capture_time_us, now() - frame.ingest_time,
                                            stream.device, frame.public, error=f"frame dropped ({reason})"))

    def _count_drop(self, stream: Stream, reason: str) -> None:
        stream.stats.record_drop(reason)
        if self.metrics is not None:
            self.metrics.dropped(stream.metrics_label, reason).inc()

    def _on_reconnect(self, stream: Stream) -> None:
        if self.metrics is not None:
            self.metrics.reconnects.labels(stream.metrics_label).inc()

    def _lookup(self, stream_id: str) -> Stream | None:
        return self._streams.get(stream_id) or self._private.get(stream_id)

    def _publish(self, result: FrameResult) -> None:
        stream = self._lookup(result.stream_id)
        if stream is not None and not stream.accept(result.frame_id):  # a newer frame's result went out first
            self._count_drop(stream, "superseded")
            return
        if stream is not None:
            label = stream.metrics_label
            if result.error:
                stream.stats.record_drop("error")
            else:
                stream.stats.record(result.latency_s, len(result.detections))
            if self.metrics is not None:
                if result.error:
                    self.metrics.dropped(label, "error").inc()
                else:
                    series = self.metrics.series(label, result.device)
                    series.latency.observe(result.latency_s)
                    series.processed.inc()
        self.fanout.publish(result)

    def _on_batch(self, device: str, size: int, seconds: float) -> None:
        if device in self._failed:  # the engine works again: the server can serve
            self._failed.discard(device)
            self.placement.set_healthy(device, True)
            self.on_health_change(not self.draining)
        if self.metrics is not None and size:
            inference, batch_size = self.metrics.runs(device)
            inference.observe(seconds)
            batch_size.observe(size)

    def _on_subscriber_overflow(self, n: int) -> None:
        if self.metrics is not None:
            self.metrics.results_dropped.inc(n)

    def _on_engine_failure(self, device: str, error: str) -> None:
        """An engine failed several batches in a row: move its streams to the healthy devices, if any."""
        if self.metrics is not None:
            self.metrics.engine_failures.labels(device).inc()
        self._failed.add(device)
        others = [d for d in self.placement.healthy_devices() if d != device]
        if not others:
            log.error("%s keeps failing (%s) and no other device is healthy: NOT_SERVING", device, error)
            self.on_health_change(False)
            return
        log.error("%s keeps failing (%s): moving its streams to %s", device, error, ",".join(others))
        self.placement.set_healthy(device, False)
        with self._lock:
            moving = [s for s in [*self._streams.values(), *self._private.values()] if s.device == device]
            for stream in moving:
                old = stream.runtime
                pending = old.scheduler.remove_stream(stream.stream_id) if old is not None else []
                stream.bind(self.runtimes[self.placement.assign(stream.stream_id, stream.max_fps)])
                for frame in pending:  # re-letterboxing for another input size is not worth it: drop
                    self._drop(frame, "error")

    # ----------------------------------------------------------------------------------------- watchdog, info
    def _watch(self) -> None:
        """Restart pulled sources that stopped delivering frames while STREAMING; refresh placement rates;
        re-test failed engines every RECHECK_S (a device that works again takes new streams)."""
        stall = self.config.rtsp.stall_s
        last_recheck = now()
        while not self._stop.wait(min(0.25, stall / 4)):
            if self._failed and now() - last_recheck > RECHECK_S:
                last_recheck = now()
                for device in list(self._failed):
                    self._recheck(device)
            with self._lock:
                streams = list(self._streams.values())
            t = now()
            for s in streams:
                src = s.source
                if src is None or not src.watchdog or s.state != StreamState.STREAMING:
                    continue
                idle = t - src.last_frame_at
                if idle > stall:
                    log.warning("stream %s stalled (no frame for %.1f s): reconnecting", s.stream_id, idle)
                    src.restart(f"stalled: no frame for {idle:.1f} s")
                self.placement.update_fps(s.stream_id, s.stats.fps(t))

    def _recheck(self, device: str) -> None:
        rt = self.runtimes[device]
        try:
            rt.engine.infer(np.full((1, *rt.planner.imgsz, 3), 114, np.uint8))
        except Exception as e:
            log.warning("%s: engine still failing (%s: %s)", device, type(e).__name__, e)
            return
        log.info("%s: engine works again", device)
        self._on_batch(device, 0, 0.0)

    def live_snapshot(self) -> LiveSnapshot:
        """Streams by state, per-device queue depth and engine health, for the metrics scrape."""
        snap = LiveSnapshot()
        with self._lock:
            streams = list(self._streams.values())
        for s in streams:
            snap.streams_by_state[s.state.name] = snap.streams_by_state.get(s.state.name, 0) + 1
            snap.stream_states[s.stream_id] = s.state.name
        failed = set(self._failed)
        for name, rt in self.runtimes.items():
            snap.device_healthy[name] = name not in failed
            st = rt.scheduler.stats()
            snap.queue_depth[name] = st.queued
            snap.in_flight[name] = st.in_flight
        return snap

    def server_info(self) -> ServerInfoView:
        """Engines, devices, class names, input size and SLO."""
        rts = list(self.runtimes.values())
        info = rts[0].engine.info if rts else EngineInfo(names={}, imgsz=(0, 0))
        names = [info.names.get(i, str(i)) for i in range(max(info.names, default=-1) + 1)]
        return ServerInfoView(
            __version__, [(rt.engine_path, rt.name, rt.engine.info, self.config.instances) for rt in rts],
            list(self.runtimes), names, tuple(info.imgsz), self.config.slo_ms,
            max((rt.max_batch for rt in rts), default=self.config.max_batch), self.config.max_streams,
            self.config.process_late)

    def class_name(self, class_id: int, device: str | None = None) -> str:
        """The class name for an id from the engine of `device` (or the first one)."""
        rt = self.runtimes.get(device or "") or next(iter(self.runtimes.values()), None)
        return rt.engine.info.names.get(class_id, str(class_id)) if rt else str(class_id)
