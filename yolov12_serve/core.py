"""The server core: loads an engine per device, keeps the stream registry, places streams, publishes results, and
keeps devices honest (a device whose engine fails or hangs hands its streams to the others).

Everything the API does goes through here (`add_stream`, `remove_stream`, `list_streams`, `open_push`,
`open_image`, `server_info`, `drain`); the core owns one `DeviceRuntime` per device (runtime.py: engine, input
planner, scheduler, worker, health) and the results fan-out. Threads: one per pulled source, K per device worker,
one watchdog (stalled cameras, placement rates, when to re-check a failed device), one run supervisor (engine
runs past their deadline: supervisor.py), and a short-lived probe thread per device re-checking its engine (a
probe may hang too: it blocks nothing else). The API's asyncio loop only reads fan-out subscriptions.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.base import EngineInfo

from . import __version__
from .config import ServerConfig, StreamSpec, redact_url, url_kind, validate_stream_id
from .devices import engine_device, split_cpu_threads
from .errors import (
    ConfigError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    ServerError,
    StreamExistsError,
    StreamNotFoundError,
    UnavailableError,
)
from .fanout import Fanout
from .frames import Frame, FrameResult, now
from .health import DeviceHealth, Verdict
from .metrics import LiveSnapshot, Metrics
from .placement import Placement
from .runtime import DeviceRuntime, EngineLoader, LoadedEngine, load_engine, release_freed_memory
from .scheduler import DeadlineScheduler
from .sources import StreamState, make_source
from .sources.push import decode_frame
from .state import StreamStore
from .stream import Stream, StreamView
from .supervisor import Run, RunDeadline, RunSupervisor
from .worker import BatchOutcome, DeviceWorker

__all__ = ["DeviceRuntime", "DeviceStatusView", "EngineLoader", "ServerCore", "ServerInfoView"]

log = logging.getLogger(__name__)

IMAGE_LABEL = "_image"  # the metrics label shared by all one-off DetectImage frames


@dataclass(frozen=True)
class DeviceStatusView:
    """One device as GetServerInfo reports it: healthy or not, and why."""

    device: str
    healthy: bool
    state: str
    error: str
    model_version: str


@dataclass(frozen=True)
class ServerInfoView:
    """What GetServerInfo reports."""

    version: str
    engines: list[tuple[str, str, EngineInfo, int, str]]  # (path, device, info, instances, model version)
    devices: list[str]
    class_names: list[str]
    input_hw: tuple[int, int]
    slo_ms: float
    max_batch: int
    max_streams: int
    process_late: bool
    device_status: list[DeviceStatusView]


def _default_loader(path: str, device: str = "cpu", instances: int = 1, **opts):
    """engines.load on the backend's device for a server device ('cpu:1', one of --gpus cpu:N, opens on 'cpu')."""
    import engines

    return engines.load(path, device=engine_device(device), instances=instances, **opts)


class ServerCore:
    """Engines per device, stream registry, placement, watchdog, failover and fan-out; thread-safe."""

    def __init__(self, config: ServerConfig, load_engine: EngineLoader | None = None) -> None:
        self.config = config
        self._load_engine = load_engine
        self.runtimes: dict[str, DeviceRuntime] = {}
        self.placement = Placement()
        self.metrics: Metrics | None = None
        self.fanout = Fanout(on_overflow=self._on_subscriber_overflow)
        self.supervisor = RunSupervisor(self._on_hung)
        self.deadline = RunDeadline(config.run_deadline_floor_s, config.run_deadline_factor)
        self.store = StreamStore(config.state_dir) if config.state_dir else None
        self._saved: list[StreamSpec] = []  # read from the store at start, added again by restore_streams()
        self._streams: dict[str, Stream] = {}
        self._private: dict[str, Stream] = {}
        self._lock = threading.RLock()
        self._failover_lock = threading.Lock()  # one device's streams move at a time (two failing at once)
        self._over_since: dict[str, float] = {}  # device -> since when its load is over capacity (rebalancing)
        self._reload_lock = threading.Lock()  # one engine reload at a time, the next waits
        self._names: dict[str, dict[int, str]] = {}  # model version -> class names (results name their classes
        # by the engine that ran them, also across a swap that changes them)
        self._image_ids = itertools.count()
        self._epochs = itertools.count(1)  # stream incarnations: every registration gets the next
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.ready = False
        self.draining = False
        self.on_health_change: Callable[[bool], None] = lambda serving: None
        self.on_device_health: Callable[[str, bool], None] = lambda device, healthy: None

    @property
    def loader(self) -> EngineLoader:
        """How engine files are opened (the default looked up at call time, so a test may wrap it)."""
        return self._load_engine or _default_loader

    # ----------------------------------------------------------------------------------------- start / stop
    def start(self) -> None:
        """Load and warm up one engine per device, start the workers, the supervisor and the watchdog (blocking)."""
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
        if self.store is not None:  # a state folder that cannot be used is said before the engines load
            self.store.open()
            self._saved = self.store.load()
        self.metrics = Metrics(cfg.slo_s, cfg.devices, cfg.max_batch, snapshot=self.live_snapshot)
        for i, device in enumerate(cfg.devices):
            self.runtimes[device] = self._start_device(device, paths[i] if len(paths) > 1 else paths[0])
        self.supervisor.start()
        self._watchdog = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._watchdog.start()
        self.ready = True
        for device in self.runtimes:
            self.on_device_health(device, True)
        self._update_serving()

    def engine_path(self, device: str) -> str:
        """The engine file configured for `device`."""
        paths = self.config.engines
        return paths[self.config.devices.index(device)] if len(paths) > 1 else paths[0]

    def _threads_per_instance(self) -> int | None:
        return self.config.threads or split_cpu_threads(self.config.devices, self.config.instances)

    def _start_device(self, device: str, path: str) -> DeviceRuntime:
        cfg = self.config
        loaded = load_engine(self.loader, device, path, cfg.instances, cfg.max_batch, self._threads_per_instance())
        self._warn_if_too_slow(device, loaded.cost.predict(1, loaded.camera_shape, 0.5))
        scheduler = DeadlineScheduler(loaded.cost, loaded.max_batch, cfg.process_late, on_drop=self._drop)
        worker = DeviceWorker(device, loaded.engine, scheduler, self._publish, threads=cfg.instances,
                              on_outcome=self._on_outcome, on_error=self._on_worker_error,
                              supervisor=self.supervisor, deadline=self.deadline, model_version=loaded.version)
        rt = DeviceRuntime(device, loaded, scheduler, worker, DeviceHealth(device, cfg.failures_before_unhealthy))
        self.placement.add_device(device, cfg.instances, loaded.frame_cost_s)
        self._names[loaded.version] = loaded.info.names
        worker.start()
        info = loaded.info
        log.info("%s: %s (model %s, %s, input %s, batch <= %d, %d instances)", device, path, loaded.version,
                 info.precision, info.imgsz, loaded.max_batch, cfg.instances)
        return rt

    # ----------------------------------------------------------------------------------------- hot engine swap
    def reload_engines(self, paths: list[str] | None = None) -> ServerInfoView:
        """Load the engine files again (or `paths`: one for all devices or one per device) beside the running ones,
        warm them up, switch every device over between two batches and free the old engines once their last
        batch ends (blocking, seconds). A file that cannot be loaded or warmed up is refused
        (FailedPreconditionError) and every running engine kept: all devices switch, or none. Reloads run one
        after another (a second waits for the first)."""
        self._check_serving()
        with self._reload_lock:
            self._check_serving()
            return self._reload(list(paths) if paths else list(self.config.engines))

    def _reload(self, paths: list[str]) -> ServerInfoView:
        cfg = self.config
        if len(paths) not in (1, len(cfg.devices)):
            raise InvalidArgumentError(f"{len(paths)} engine files for {len(cfg.devices)} devices: give one file for "
                                       "all devices or one per device")
        for p in paths:
            if not Path(p).is_file():
                raise InvalidArgumentError(f"engine file not found: {p}")
        log.info("reloading engines: %s", ", ".join(paths))
        loaded: dict[str, LoadedEngine] = {}
        for i, device in enumerate(cfg.devices):
            path = paths[i] if len(paths) > 1 else paths[0]
            try:
                loaded[device] = load_engine(self.loader, device, path, cfg.instances, cfg.max_batch,
                                             self._threads_per_instance())
            except Exception as e:  # a bad file: nothing switches
                for done in loaded.values():
                    done.engine.close()
                why = f"{path} cannot serve on {device} ({type(e).__name__}: {str(e)[:300]})"
                log.error("engine reload refused: %s; the running engines are kept", why)
                raise FailedPreconditionError(f"{why}; the running engines are kept") from None
        switched_at = now()
        old: dict[str, LoadedEngine] = {}
        with self._failover_lock:
            for device, new in loaded.items():
                rt = self.runtimes[device]
                self._names[new.version] = new.info.names
                old[device] = rt.swap(new)
                self.placement.set_cost(device, new.frame_cost_s)
        cfg.engines = paths
        for device, new in loaded.items():
            log.info("%s: now serving %s (model %s, was %s)", device, new.path, new.version, old[device].version)
            rt = self.runtimes[device]
            if rt.health.reset() is Verdict.RECOVERED:
                self._recover(rt)
        for device, previous in old.items():
            self._close_when_idle(device, previous, switched_at)
        return self.server_info()

    def _close_when_idle(self, device: str, previous: LoadedEngine, switched_at: float) -> None:
        """Free an engine swapped out once the runs that started on it before `switched_at` have ended (a hung one
        keeps it: it is left to the process exit, and said so)."""
        end = now() + self.deadline.floor_s + 5.0
        while any(r.started <= switched_at for r in self.supervisor.running(device)) and now() < end:
            self._stop.wait(0.01)
        if any(r.started <= switched_at for r in self.supervisor.running(device)):
            log.warning("%s: the old engine (model %s) still has a run in progress: it is not freed", device,
                        previous.version)
            return
        previous.engine.close()
        release_freed_memory()

    def class_names(self, model_version: str, device: str = "") -> dict[int, str]:
        """Class names of the model that produced a result (its version), else of `device`'s engine now."""
        names = self._names.get(model_version)
        if names is not None:
            return names
        rt = self.runtimes.get(device) or next(iter(self.runtimes.values()))
        return rt.engine.info.names

    def _warn_if_too_slow(self, device: str, one_frame_s: float) -> None:
        if one_frame_s > self.config.slo_s:
            log.warning("%s: one frame takes %.0f ms, more than the %.0f ms SLO: every frame will miss it; raise "
                        "--slo-ms, or use a smaller / faster engine (or a quieter machine)", device,
                        one_frame_s * 1000, self.config.slo_ms)

    def drain(self, timeout: float = 5.0) -> None:
        """Stop taking work, stop the sources, let frames in flight finish (up to `timeout`), stop the workers."""
        with self._lock:
            if self.draining:
                return
            self.draining = True
            streams = list(self._streams.values())
        self._update_serving()
        for s in streams:
            if s.source is not None:
                s.source.stop()
        end = now() + timeout
        while now() < end and any(rt.scheduler.stats().in_flight for rt in self.runtimes.values()):
            self._stop.wait(0.02)
        self._stop.set()
        self.supervisor.stop()
        for rt in self.runtimes.values():
            rt.worker.stop(max(0.1, end - now()))
        self.fanout.close_all()
        for s in streams:
            s.close()
        for rt in self.runtimes.values():
            if not self.supervisor.running(rt.name):  # an engine stuck in a hung run is left to the process exit
                rt.engine.close()
        if self.metrics is not None:
            self.metrics.stop()

    # ----------------------------------------------------------------------------------------- streams
    def add_stream(self, spec: StreamSpec, persist: bool = True) -> StreamView:
        """Validate, register and start pulling a camera; returns at once (state CONNECTING). With `persist` (a
        stream added over gRPC) and a state folder, the stream set is saved before this returns: a stream
        acknowledged is a stream a restart brings back (UNAVAILABLE, and nothing added, when it cannot be saved)."""
        stream = self._add(spec, persistent=persist and self.store is not None)
        if stream.persistent:
            try:
                self._save_streams()
            except OSError as e:
                self._unregister(stream, "removed")
                raise UnavailableError(f"cannot save the stream set in {self.store.folder} "
                                       f"({e.strerror or e}): the stream was not added") from None
        stream.source.start()
        log.info("stream %s added (%s) on %s", stream.stream_id, stream.url, stream.device)
        return stream.view()

    def _add(self, spec: StreamSpec, persistent: bool) -> Stream:
        validate_stream_id(spec.stream_id)
        kind = url_kind(spec.url, self.config.allow_files)
        if spec.max_fps < 0:
            raise InvalidArgumentError(f"max_fps must be >= 0 (0: every frame), got {spec.max_fps}")
        stream = self._register(spec.stream_id, redact_url(spec.url), kind, spec.max_fps, droppable=True)
        stream.spec, stream.persistent = spec, persistent
        try:
            stream.source = make_source(kind, stream, spec.url, self.config.rtsp)
        except Exception:
            self._unregister(stream, "removed")
            raise
        return stream

    def restore_streams(self) -> int:
        """Add the streams saved in the state folder again (after the command line's: an id given there wins);
        returns how many. A saved stream that cannot be added is logged and dropped from the set."""
        saved, self._saved = self._saved, []
        restored, dropped = 0, False
        for spec in saved:
            if self.has_stream(spec.stream_id):
                log.warning("stream %s is saved in %s and given on the command line: the command line's is used",
                            spec.stream_id, self.store.folder if self.store else "?")
                dropped = True
                continue
            try:
                stream = self._add(spec, persistent=True)
            except ServerError as e:
                log.error("stream %s saved in %s cannot be added again (%s); it is dropped from the saved set",
                          spec.stream_id, self.store.folder if self.store else "?", e)
                dropped = True
                continue
            stream.source.start()
            restored += 1
        if dropped:
            self._save_streams_logged()
        if restored:
            log.info("%d streams restored from %s", restored, self.store.folder if self.store else "?")
        return restored

    def _save_streams(self) -> None:
        if self.store is not None:
            self.store.save(self._persistent_specs)

    def _save_streams_logged(self) -> None:
        try:
            self._save_streams()
        except OSError as e:
            log.error("cannot save the stream set in %s (%s): a restart may bring back removed streams",
                      self.store.folder if self.store else "?", e.strerror or e)

    def _persistent_specs(self) -> list[StreamSpec]:
        with self._lock:
            return [s.spec for s in self._streams.values() if s.persistent and s.spec is not None]

    def open_push(self, stream_id: str) -> Stream:
        """Register a stream fed by a Detect call (listed as push://; its frames run in order, a late one is answered
        as dropped)."""
        validate_stream_id(stream_id)
        stream = self._register(stream_id, "push://", "push", 0.0, droppable=False)
        stream.set_state(StreamState.STREAMING)
        return stream

    def open_image(self) -> Stream:
        """A private one-off stream for DetectImage (not listed, not watched, metrics under one shared label, one
        turn under overload for all of them); RESOURCE_EXHAUSTED beyond --max-pending-images at once."""
        self._check_serving()
        sid = f"\x00image-{next(self._image_ids)}"
        with self._lock:
            if len(self._private) >= self.config.max_pending_images:
                raise ResourceExhaustedError(f"{len(self._private)} images are being detected already (the limit, "
                                             "--max-pending-images): retry later, or push a stream with Detect")
            stream = Stream(sid, "image://", "image", 0.0, self.config.slo_s, self._on_ingest, self._drop,
                            self._on_reconnect, droppable=False, public=False, metrics_label=IMAGE_LABEL,
                            epoch=next(self._epochs), group=IMAGE_LABEL)
            stream.bind(self.runtimes[self.placement.assign(sid)])
            self._private[sid] = stream
        return stream

    def close_stream(self, stream: Stream) -> StreamView:
        """End a push or image stream (the call that fed it is over); a no-op if it was removed meanwhile (the id
        may name a newer incarnation by now: that one is left alone)."""
        with self._lock:
            if stream.public and self._streams.get(stream.stream_id) is stream:
                self._unregister(stream, "removed")
            elif not stream.public and self._private.get(stream.stream_id) is stream:
                del self._private[stream.stream_id]
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
        with self._lock:  # registration and removal are one step each: an id re-added never meets its old self
            if stream_id in self._streams:
                raise StreamExistsError(f"stream {stream_id!r} already exists: remove it first or pick another id")
            if len(self._streams) >= self.config.max_streams:
                raise ResourceExhaustedError(f"stream limit reached ({self.config.max_streams}): remove a stream "
                                             "or start the server with a larger --max-streams")
            stream = Stream(stream_id, url, kind, max_fps, self.config.slo_s, self._on_ingest, self._drop,
                            self._on_reconnect, droppable=droppable, epoch=next(self._epochs))
            device = self.placement.assign(stream_id, max_fps)
            stream.bind(self.runtimes[device])
            self._streams[stream_id] = stream
            if self.metrics is not None:
                self.metrics.add_stream(stream_id)
        return stream

    def remove_stream(self, stream_id: str) -> StreamView:
        """Stop a stream and free what it held; NOT_FOUND if it is unknown."""
        with self._lock:
            stream = self._streams.get(stream_id)
            if stream is None:
                raise StreamNotFoundError(f"no stream {stream_id!r} (ListStreams shows the registered ids)")
            self._unregister(stream, "removed")
        if stream.persistent:
            self._save_streams_logged()
        log.info("stream %s removed", stream_id)
        return stream.view()

    def _unregister(self, stream: Stream, reason: str) -> None:
        """Forget a public stream and free what it held: source, mailbox, placement, metric series. Under the
        lock as a whole, so that a registration of the same id comes before or after it, never in between (it
        used to remove the new stream's mailbox, placement and series)."""
        with self._lock:
            if self._streams.get(stream.stream_id) is stream:
                del self._streams[stream.stream_id]
            if stream.source is not None:
                stream.source.stop()
            self._unbind(stream, reason)
            self.placement.release(stream.stream_id)
            if self.metrics is not None:
                self.metrics.forget_stream(stream.stream_id)

    def _unbind(self, stream: Stream, reason: str) -> None:
        with self._lock:
            if stream.runtime is not None:
                for pending in stream.runtime.scheduler.remove_stream(stream.stream_id, stream.epoch):
                    self._drop(pending, reason)
            stream.close()
            if not stream.public:
                self.placement.release(stream.stream_id)

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
        if self.metrics is not None and self._lookup(stream.stream_id, stream.epoch) is stream:  # not once removed
            self.metrics.series(stream.metrics_label, stream.device).frames.inc()

    def _drop(self, frame: Frame, reason: str) -> None:
        stream = self._lookup(frame.stream_id, frame.epoch)
        if stream is None:
            return  # removed meanwhile (maybe added again: a new stream): its series are gone too
        self._count_drop(stream, reason)
        if not frame.droppable:  # a push or DetectImage caller waits for this frame: answer it with the reason
            why = ("it could not run within the latency objective: the server is overloaded" if reason == "late"
                   else reason)
            self.fanout.publish(FrameResult(frame.stream_id, frame.frame_id, np.zeros((0, 6), np.float32),
                                            frame.letterbox.src_hw, frame.capture_time_us, now() - frame.ingest_time,
                                            stream.device, frame.public, error=f"frame dropped ({why})",
                                            epoch=frame.epoch, drop_reason=reason))

    def _count_drop(self, stream: Stream, reason: str) -> None:
        stream.stats.record_drop(reason)
        if self.metrics is not None:
            self.metrics.dropped(stream.metrics_label, reason).inc()

    def _on_reconnect(self, stream: Stream) -> None:
        if self.metrics is not None:
            self.metrics.reconnects.labels(stream.metrics_label).inc()

    def _lookup(self, stream_id: str, epoch: int) -> Stream | None:
        """The registered stream of this id and incarnation (None once removed, even if the id was added again)."""
        stream = self._streams.get(stream_id) or self._private.get(stream_id)
        return stream if stream is not None and stream.epoch == epoch else None

    def _publish(self, result: FrameResult) -> None:
        stream = self._lookup(result.stream_id, result.epoch)
        if stream is None:
            return  # its stream was removed while the frame ran: nobody is owed it (a new incarnation least of all)
        if not stream.accept(result.frame_id):  # a newer frame's result went out first
            self._count_drop(stream, "superseded")
            return
        label = stream.metrics_label
        if result.error:
            stream.stats.record_drop("error")
            stream.note_error(result.error)
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

    def _on_subscriber_overflow(self, n: int) -> None:
        if self.metrics is not None:
            self.metrics.results_dropped.inc(n)

    # ----------------------------------------------------------------------------------------- device health
    def _on_outcome(self, outcome: BatchOutcome) -> None:
        """A batch ran (or raised): metrics, then the device's health decides whether anything must change."""
        rt = self.runtimes.get(outcome.device)
        if rt is None:
            return
        if outcome.error is None:
            if self.metrics is not None:
                inference, batch_size = self.metrics.runs(outcome.device)
                inference.observe(outcome.seconds)
                batch_size.observe(outcome.size)
            verdict = rt.health.succeeded(outcome.shape, outcome.started)
        else:
            if self.metrics is not None:
                self.metrics.engine_failures.labels(outcome.device).inc()
            verdict = rt.health.failed(outcome.error, outcome.shape, outcome.size)
        self._act(rt, verdict)

    def _on_worker_error(self, device: str) -> None:
        if self.metrics is not None:
            self.metrics.worker_errors.labels(device).inc()

    def _on_hung(self, run: Run) -> None:
        """The supervisor found a run past its deadline (its thread): answer its frames, replace its thread, and
        take the device out of service."""
        rt = self.runtimes.get(run.device)
        if rt is None:
            return
        if self.metrics is not None:
            self.metrics.engine_hangs.labels(run.device).inc()
        error = f"engine run hung: {run.describe()} got no answer within {run.deadline_s:.1f} s"
        log.error("%s: %s%s", run.device, error, "" if run.owner is not None else " (a re-check)")
        if run.owner is not None:
            rt.worker.abandon(run)  # its frames answered first: a result of a moved stream's later frame would
        self._act(rt, rt.health.hung(error, run.shape, run.size))  # make them superseded
        rt.worker.replenish()  # after the move: the new thread must find no frame of theirs left to hang on

    def _act(self, rt: DeviceRuntime, verdict: Verdict) -> None:
        if verdict is Verdict.PROBE:
            fault = rt.health.fault
            log.warning("%s: %d batches in a row failed, all at %s (%s): probing a shape it ran before to tell the "
                        "device from the input", rt.name, rt.health.streak, fault.shape if fault else "?",
                        fault.error if fault else "")
            self._start_probe(rt)
        elif verdict is Verdict.UNHEALTHY:
            self._fail_over(rt)
        elif verdict is Verdict.RECOVERED:
            self._recover(rt)

    def _start_probe(self, rt: DeviceRuntime) -> None:
        """Probe the device's engine in a thread of its own (at most one per device: a probe may hang)."""
        with rt.lock:
            if rt.probing or self._stop.is_set():
                return
            rt.probing = True
            rt.last_probe = now()
        threading.Thread(target=self._probe, args=(rt,), name=f"probe-{rt.name}", daemon=True).start()

    def _probe(self, rt: DeviceRuntime) -> None:
        try:
            plan = rt.health.probe_plan(rt.loaded.known_shapes)
            if plan is None:
                return
            shape, size = plan
            ok, error = rt.probe(shape, size, self.supervisor, self.deadline)
            if ok is None:
                return  # it hung: the supervisor reported that
            if not ok:
                log.warning("%s: engine still failing on a batch of %d at %dx%d (%s)", rt.name, size, *shape, error)
            refused = rt.health.refused_shapes
            self._act(rt, rt.health.probed(ok, error))
            new = rt.health.refused_shapes - refused
            for shape in new:
                log.error("%s: the engine fails on %dx%d inputs but runs others: frames of that shape fail alone "
                          "(their streams show the error); the device keeps serving", rt.name, *shape)
        except Exception:
            log.exception("%s: probing the engine failed", rt.name)
        finally:
            with rt.lock:
                rt.probing = False
                rt.last_probe = now()

    def _fail_over(self, rt: DeviceRuntime) -> None:
        """Take a device out of service: its streams move to the healthy devices (serialised: two devices failing
        at once must not pick each other), health and metrics say so; with no healthy device left the streams
        stay (NOT_SERVING) and the re-checks go on."""
        fault = rt.health.fault
        why = fault.error if fault is not None else "failing"
        with self._failover_lock:
            for name, other in self.runtimes.items():  # every device's own verdict, not a stale flag
                self.placement.set_healthy(name, other.health.healthy)
            self.on_device_health(rt.name, False)
            self._update_serving()
            if not self.placement.healthy_devices():
                log.error("%s is out of service (%s) and no other device is healthy: NOT_SERVING; its streams stay "
                          "and the engine is re-checked every %g s", rt.name, why, self.config.recheck_s)
                return
            with self._lock:
                moving = [s for s in [*self._streams.values(), *self._private.values()] if s.runtime is rt]
                targets = {}
                for stream in moving:
                    target = self.placement.assign(stream.stream_id, self._expected_fps(stream))
                    self._move(stream, self.runtimes[target])
                    targets[target] = targets.get(target, 0) + 1
                    if self.metrics is not None and stream.public:
                        self.metrics.stream_moves.labels("failover").inc()
        where = ", ".join(f"{n} to {d}" for d, n in sorted(targets.items())) or "none to move"
        log.error("%s is out of service (%s): streams moved: %s; re-checked every %g s", rt.name, why, where,
                  self.config.recheck_s)

    def _move(self, stream: Stream, target: DeviceRuntime) -> None:
        """Run a stream on `target` from its next frame; its waiting frames go along where they fit the target's
        input (the same engine geometry), else they are dropped as errors (the lock held)."""
        old = stream.runtime
        pending = old.scheduler.remove_stream(stream.stream_id, stream.epoch) if old is not None else []
        stream.bind(target)
        for frame in pending:
            if target.planner.plan(frame.letterbox.src_hw) == frame.letterbox:
                replaced = target.scheduler.submit(frame)
                if replaced is not None:
                    self._drop(replaced, "superseded" if replaced is not frame else "error")
            else:
                self._drop(frame, "error")

    def _recover(self, rt: DeviceRuntime) -> None:
        with self._failover_lock:
            self.placement.set_healthy(rt.name, True)
        log.info("%s: engine works again: the device takes streams", rt.name)
        self.on_device_health(rt.name, True)
        self._update_serving()

    def _update_serving(self) -> None:
        """Health says SERVING while the engines are loaded, the server is not draining and a device is healthy."""
        serving = self.ready and not self.draining and any(rt.health.healthy for rt in self.runtimes.values())
        self.on_health_change(serving)

    def _expected_fps(self, stream: Stream) -> float:
        """What placement should expect of a stream moving: what it offered lately, else its cap."""
        return stream.stats.offered_fps() or stream.max_fps

    # ----------------------------------------------------------------------------------------- watchdog, info
    def _watch(self) -> None:
        """Restart pulled sources that stopped delivering frames while STREAMING; refresh placement rates; start
        a re-check of each device out of service every `recheck_s` (in a probe thread: never on this one, so a
        hung re-check cannot stop stall detection)."""
        stall = self.config.rtsp.stall_s
        while not self._stop.wait(min(0.25, stall / 4)):
            try:
                self._watch_once(stall)
            except Exception:  # the watchdog must outlive any one bad round
                log.exception("watchdog round failed")

    def _watch_once(self, stall: float) -> None:
        t = now()
        for rt in list(self.runtimes.values()):
            if not rt.health.healthy and not rt.probing and t - rt.last_probe >= self.config.recheck_s:
                self._start_probe(rt)
        with self._lock:
            streams = list(self._streams.values())
        for s in streams:
            self.placement.update_fps(s.stream_id, s.stats.offered_fps(t))  # offered, not processed: see placement
            src = s.source
            if src is None or not src.watchdog or s.state != StreamState.STREAMING:
                continue
            idle = t - src.last_frame_at
            if idle > stall:
                log.warning("stream %s stalled (no frame for %.1f s): reconnecting", s.stream_id, idle)
                src.restart(f"stalled: no frame for {idle:.1f} s")
        self._rebalance(t)

    def _rebalance(self, t: float) -> None:
        """A healthy device whose cameras have offered more than it can run for `rebalance_s` hands one camera to
        a device where it lowers the busier load (one move per period, so rates settle before the next)."""
        if self.config.rebalance_s <= 0 or len(self.runtimes) < 2:
            return
        loads = self.placement.loads()
        for device, load in loads.items():
            if load <= 1.0 or not self.runtimes[device].health.healthy:
                self._over_since.pop(device, None)
                continue
            since = self._over_since.setdefault(device, t)
            if t - since < self.config.rebalance_s:
                continue
            self._over_since[device] = t  # the next move, if any, after another period
            with self._failover_lock, self._lock:
                movable = {s.stream_id for s in self._streams.values() if s.droppable and s.runtime is not None
                           and s.runtime.name == device}
                plan = self.placement.plan_move(device, movable)
                if plan is None:
                    continue
                sid, target = plan
                stream = self._streams[sid]
                self.placement.move(sid, target)
                self._move(stream, self.runtimes[target])
            if self.metrics is not None:
                self.metrics.stream_moves.labels("rebalance").inc()
            after = self.placement.loads()
            log.warning("%s has been over capacity (load %.2f) for %g s: stream %s moved to %s (loads now %.2f and "
                        "%.2f)", device, load, self.config.rebalance_s, sid, target, after[device], after[target])

    def live_snapshot(self) -> LiveSnapshot:
        """Stream counts by state, per-device queue depth, frames in flight and health, for the metrics scrape."""
        snap = LiveSnapshot()
        with self._lock:
            streams = list(self._streams.values())
        for s in streams:
            snap.streams_by_state[s.state.name] = snap.streams_by_state.get(s.state.name, 0) + 1
        for name, rt in self.runtimes.items():
            st = rt.scheduler.stats()
            snap.queue_depth[name] = st.queued
            snap.in_flight[name] = st.in_flight
            snap.device_healthy[name] = rt.health.healthy
        return snap

    def server_info(self) -> ServerInfoView:
        """Engines, devices and their health, class names, input size and SLO."""
        rts = list(self.runtimes.values())
        info = rts[0].engine.info if rts else EngineInfo(names={}, imgsz=(0, 0))
        names = [info.names.get(i, str(i)) for i in range(max(info.names, default=-1) + 1)]
        status = []
        for rt in rts:
            fault = rt.health.fault
            status.append(DeviceStatusView(rt.name, rt.health.healthy, rt.health.state.value,
                                           fault.error if fault is not None else "", rt.version))
        return ServerInfoView(
            __version__, [(rt.engine_path, rt.name, rt.engine.info, self.config.instances, rt.version) for rt in rts],
            list(self.runtimes), names, tuple(info.imgsz), self.config.slo_ms,
            max((rt.max_batch for rt in rts), default=self.config.max_batch), self.config.max_streams,
            self.config.process_late, status)

    def class_name(self, class_id: int, device: str | None = None) -> str:
        """The class name for an id from the engine of `device` (or the first one)."""
        rt = self.runtimes.get(device or "") or next(iter(self.runtimes.values()), None)
        return rt.engine.info.names.get(class_id, str(class_id)) if rt else str(class_id)
