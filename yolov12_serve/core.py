"""The server core: loads an engine per device, keeps the stream registry, places streams, publishes results; with
its two other parts it keeps devices honest (failover.py: a device whose engine fails or hangs hands its streams
to the others) and swaps engines while streams flow (swap.py).

Everything the API does goes through here (`add_stream`, `remove_stream`, `list_streams`, `open_push`,
`open_image`, `server_info`, `drain`); the core owns one `DeviceRuntime` per device (runtime.py: engine, input
planner, scheduler, worker, health) and the results fan-out. Threads: one per pulled source, K per device worker,
one watchdog (stalled cameras, placement rates, when to re-check a failed device), one run supervisor (engine
runs past their deadline: supervisor.py), and a short-lived probe thread per device re-checking its engine (a
probe may hang too: it blocks nothing else). The API's asyncio loop only reads fan-out subscriptions.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.base import EngineError, EngineInfo

from . import __version__
from .config import ServerConfig, StreamSpec, quote_id, redact_url, url_kind, validate_stream_id
from .devices import engine_device, split_cpu_threads
from .errors import (
    ConfigError,
    FailedPreconditionError,
    ResourceExhaustedError,
    ServerError,
    StreamExistsError,
    StreamNotFoundError,
    UnavailableError,
    WrongShardError,
)
from .evidence import EvidenceFolder, EvidenceRecorder, Picture
from .failover import DeviceCare
from .fanout import Fanout, Subscription
from .faultlog import FaultLog
from .frames import Frame, FrameResult, now
from .health import DeviceHealth
from .metrics import LiveSnapshot, Metrics
from .mqtt import MqttOptions, MqttPublisher
from .placement import Placement
from .processes import ProcessDevices
from .procs import RemoteRuntime, RemoteSource
from .runtime import DeviceRuntime, EngineLoader, load_engine
from .scheduler import DeadlineScheduler
from .snapshot import PictureUnreadableError, encode_jpeg
from .sources import StreamState, make_source
from .sources.push import decode_frame
from .sources.synthetic import parse_synthetic_url
from .sparkplug import KINDS as SPARKPLUG_KINDS
from .sparkplug import SparkplugPublisher
from .state import StreamStore, nearest_folder
from .stream import Stream, StreamView
from .supervisor import RunDeadline, RunSupervisor
from .swap import EngineSwap, check_engine_path, engine_files_signature
from .tracking import Tracker
from .worker import DeviceWorker

__all__ = ["DeviceRuntime", "DeviceStatusView", "EngineLoader", "ServerCore", "ServerInfoView"]

log = logging.getLogger(__name__)

IMAGE_LABEL = "_image"  # the metrics label shared by all one-off DetectImage frames
SNAPSHOT_WAIT_S = 5.0  # how long GetSnapshot waits for a camera's next frame


@dataclass(frozen=True)
class DeviceStatusView:
    """One device as GetServerInfo reports it: healthy or not, and why."""

    device: str
    healthy: bool
    state: str
    error: str
    model_version: str
    pid: int = 0  # the process serving the device (--worker-processes); 0: the server's own


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


class ServerCore(DeviceCare, EngineSwap, ProcessDevices):
    """Engines per device, stream registry, placement, watchdog and fan-out; failover (failover.py), hot engine
    swap (swap.py) and devices in processes of their own (processes.py) are its other parts. Thread-safe."""

    def __init__(self, config: ServerConfig, load_engine: EngineLoader | None = None) -> None:
        self.config = config
        self._load_engine = load_engine
        self.runtimes: dict[str, DeviceRuntime] = {}
        self.placement = Placement()
        self.metrics: Metrics | None = None
        self.evidence: EvidenceRecorder | None = None  # --evidence-dir (made at start)
        self.mqtt: MqttPublisher | None = None  # --mqtt (made at start)
        self.fanout = Fanout(on_overflow=self._on_subscriber_overflow)
        self.supervisor = RunSupervisor(self._on_hung)
        self.deadline = RunDeadline(config.run_deadline_floor_s, config.run_deadline_factor)
        self.store = StreamStore(config.state_dir) if config.state_dir else None
        self._saved: list[StreamSpec] = []  # read from the store at start, added again by restore_streams()
        self._streams: dict[str, Stream] = {}
        self._private: dict[str, Stream] = {}
        self._sync_lock = threading.Lock()  # one sync_counts at a time (two scrapes at once would add twice)
        self._lock = threading.RLock()
        self._failover_lock = threading.Lock()  # one device's streams move at a time (two failing at once)
        self._over_since: dict[str, float] = {}  # device -> since when its load is over capacity (rebalancing)
        self._recheck_faults: dict[str, FaultLog] = {}  # device -> its failed re-checks, logged on change
        self._reload_lock = threading.Lock()  # one engine reload at a time, the next waits
        self._loaded_files: tuple = ()  # the engine files as they were when loaded (swap.engine_files_signature)
        self._names: dict[str, dict[int, str]] = {}  # model version -> class names (results name their classes
        # by the engine that ran them, also across a swap that changes them)
        self._image_ids = itertools.count()
        self._watch_ids = itertools.count(1)  # watchers are numbered in their metric label
        self._epochs = itertools.count(1)  # stream incarnations: every registration gets the next
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.supervision_turned_at = now()  # the watchdog thread's last turn (systemd's watchdog pings check it)
        self.ready = False
        self.starting = True  # until the streams of the command line and the state folder are back (`opened`)
        self.draining = False
        self.on_health_change: Callable[[bool], None] = lambda serving: None
        self.on_device_health: Callable[[str, bool], None] = lambda device, healthy: None

    @property
    def loader(self) -> EngineLoader:
        """How engine files are opened (the default looked up at call time, so a test may wrap it)."""
        return self._load_engine or _default_loader

    # ----------------------------------------------------------------------------------------- start / stop
    def start(self, hold: bool = False) -> None:
        """Load and warm up one engine per device, start the workers, the supervisor and the watchdog (blocking).
        `hold`: health stays NOT_SERVING until `opened()` (the caller adds its streams first)."""
        cfg = self.config
        paths = cfg.engines
        if not paths:
            raise ConfigError("no engine given: pass --engines model.onnx (or --demo for the bundled model)")
        if len(paths) not in (1, len(cfg.devices)):
            raise ConfigError(f"--engines lists {len(paths)} files for {len(cfg.devices)} devices: give one file "
                              "for all devices or one per device")
        for p in paths:
            check_engine_path(p)
        self._loaded_files = engine_files_signature(list(paths))  # before they are read (SIGHUP compares)
        if self.store is not None:  # a state folder that cannot be used is said before the engines load
            self.store.open()
            self._saved = self.store.load()
        self.metrics = Metrics(cfg.slo_s, cfg.devices, cfg.max_batch, snapshot=self.live_snapshot,
                               before_scrape=self.sync_counts)
        if cfg.evidence_dir is not None:
            nearest_folder(cfg.evidence_dir, "--evidence-dir")  # a file in the way: said as --check says it
            try:
                folder = EvidenceFolder(Path(cfg.evidence_dir), int(cfg.evidence_max_mb * 1024 * 1024))
            except OSError as e:
                raise ConfigError(f"--evidence-dir {cfg.evidence_dir}: {e.strerror or e}; give a folder this user "
                                  "can write") from None
            skipped = self.metrics.evidence_skipped
            self.metrics.add_evidence()
            self.evidence = EvidenceRecorder(folder, take_picture=self._evidence_picture,
                                             on_written=self.metrics.evidence_written.inc,
                                             on_skipped=lambda reason, n: skipped.labels(reason).inc(n))
        if cfg.mqtt is not None:
            self._start_mqtt(cfg.mqtt)
        processes = cfg.processes and not (self._load_engine is not None and cfg.worker_processes == "auto")
        if processes:  # (an engine loader given to the core opens engines in this process: auto keeps them here)
            if self._load_engine is not None:
                raise ConfigError("device processes open engines with their own loader: give "
                                  "ServerConfig.engine_loader ('module:function') instead of load_engine")
            self._start_remote_devices({d: paths[i] if len(paths) > 1 else paths[0]
                                        for i, d in enumerate(cfg.devices)})
        for i, device in enumerate(cfg.devices if not processes else ()):
            self.runtimes[device] = self._start_device(device, paths[i] if len(paths) > 1 else paths[0])
        self.supervisor.start()
        self._watchdog = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._watchdog.start()
        self.ready = True
        for device in self.runtimes:
            self.on_device_health(device, True)
        if not hold:
            self.opened()

    def _start_mqtt(self, options: MqttOptions) -> None:
        """--mqtt: a watcher of every camera publishing to the broker (mqtt.py), connecting in the background."""
        assert self.metrics is not None
        metrics, broker, label = self.metrics, options.broker, f"mqtt {options.broker}"
        metrics.add_mqtt(broker, SPARKPLUG_KINDS if options.sparkplug else ("detections", "objects", "state"))
        metrics.add_watcher(label)
        sub = self.fanout.subscribe(None, self.config.batch_subscriber_queue, None, label=label)
        if options.sparkplug:  # Sparkplug B instead of the JSON topics (sparkplug.py)
            self.mqtt = SparkplugPublisher(options, sub, streams=self.streams, status=self.status_word,
                                           names=lambda r: self.class_names(r.model_version, r.device),
                                           class_names=self.counted_classes,
                                           on_sent=lambda kind: metrics.mqtt_messages.labels(kind).inc(),
                                           on_dropped=lambda reason: metrics.mqtt_dropped.labels(reason).inc(),
                                           on_connected=lambda up: metrics.mqtt_connected.labels(broker).set(int(up)))
            self.mqtt.start()
            return
        self.mqtt = MqttPublisher(options, sub, names=lambda r: self.class_names(r.model_version, r.device),
                                  states=lambda: {s.stream_id: (s.state.name, s.last_error) for s in self.streams()},
                                  on_sent=lambda kind: metrics.mqtt_messages.labels(kind).inc(),
                                  on_dropped=lambda reason: metrics.mqtt_dropped.labels(reason).inc(),
                                  on_connected=lambda up: metrics.mqtt_connected.labels(broker).set(int(up)),
                                  shard=str(self.config.shard.index) if self.config.shard.count > 1 else "",
                                  owns=self.config.shard.owns, settled=lambda: not self.starting)
        self.mqtt.start()

    def status_word(self) -> str:
        """The server's state in a word, as health judges it (OPC UA's Yolov12Serve.Status): starting (engines
        loading, the starting cameras being added), serving, unhealthy (no device healthy), draining."""
        if self.draining:
            return "draining"
        if not self.ready or self.starting:
            return "starting"
        return "serving" if any(rt.health.healthy for rt in list(self.runtimes.values())) else "unhealthy"

    def counted_classes(self, stream: Stream) -> list[str]:
        """The classes a tracked camera counts: those it asked for (AddStream classes), else its model's."""
        if stream.filter.classes:
            return list(stream.filter.classes)
        if not self.runtimes:
            return []
        return list(self.class_names("", stream.device).values())

    def opened(self) -> None:
        """The streams the server starts with are in: health may say SERVING, and a watch or removal of an unknown
        id is NOT_FOUND from now on (before, UNAVAILABLE: a client that came back before its camera did retries)."""
        self.starting = False
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
        worker = DeviceWorker(device, loaded.engine, scheduler, self._publish, threads=loaded.instances,
                              on_outcome=self._on_outcome, on_error=self._on_worker_error,
                              supervisor=self.supervisor, deadline=self.deadline, model_version=loaded.version)
        rt = DeviceRuntime(device, loaded, scheduler, worker, DeviceHealth(device, cfg.failures_before_unhealthy))
        self.placement.add_device(device, loaded.instances, loaded.frame_cost_s)
        self._names[loaded.version] = loaded.info.names
        worker.start()
        info = loaded.info
        log.info("%s: %s (model %s, %s, input %s, batch <= %d, %d instances)", device, path, loaded.version,
                 info.precision, info.imgsz, loaded.max_batch, loaded.instances)
        return rt

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
        if self.evidence is not None:
            self.evidence.close()  # what is queued is written, within 2 s: a slow or hung disk is not waited for
        for rt in self.runtimes.values():
            rt.worker.stop(max(0.1, end - now()))
        self.fanout.close_all()
        if self.mqtt is not None:
            self.mqtt.close()  # what is queued and "offline", within 2 s
        for s in streams:
            s.close()
        for rt in self.runtimes.values():
            if not self.supervisor.running(rt.name):  # an engine stuck in a hung run is left to the process exit
                rt.engine.close()
        if self.metrics is not None:
            self.metrics.stop()

    # ----------------------------------------------------------------------------------------- streams
    def add_stream(self, spec: StreamSpec, persist: bool = True, listed: bool = False) -> StreamView:
        """Validate, register and start pulling a camera; returns at once (state CONNECTING). With `persist` (a
        stream added over gRPC) and a state folder, the stream set is saved before this returns: a stream
        acknowledged is a stream a restart brings back (UNAVAILABLE, and nothing added, when it cannot be saved).
        `listed`: one of the command line's cameras (camera_list.py applies that list again on SIGHUP)."""
        self._check_classes(spec)
        stream = self._add(spec, persistent=persist and self.store is not None)
        stream.listed = listed
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

    def check_spec(self, spec: StreamSpec) -> None:
        """What `add_stream` checks before anything changes (id, shard, URL, allowed host, classes), raising as it
        would: a replacement is checked before the running camera is removed."""
        validate_stream_id(spec.stream_id)
        self.check_owner(spec.stream_id)
        self.config.camera_policy.check(spec.url, url_kind(spec.url, self.config.allow_files))
        self._check_classes(spec)

    def _check_classes(self, spec: StreamSpec) -> None:
        """InvalidArgumentError for a class the served models do not have (a typo would publish nothing). Saved
        streams are not checked again: after a swap to a model without the class they keep their other ones."""
        spec.check_known_classes({n for rt in self.runtimes.values() for n in rt.engine.info.names.values()})

    def _add(self, spec: StreamSpec, persistent: bool) -> Stream:
        validate_stream_id(spec.stream_id)
        self.check_owner(spec.stream_id)
        kind = url_kind(spec.url, self.config.allow_files)
        self.config.camera_policy.check(spec.url, kind)  # scheme and host allowed? (allowlist.py)
        blind_after_s = self.config.rtsp.blind_after_s if spec.blind_after_s is None else spec.blind_after_s
        stream = self._register(spec.stream_id, redact_url(spec.url), kind, spec.max_fps, droppable=True,
                                blind_after_s=blind_after_s)
        stream.spec, stream.persistent, stream.filter = spec, persistent, spec.detection_filter()
        stream.tracker = Tracker(new_track_score=self.config.track_min_score) if spec.track else None
        try:
            if isinstance(stream.runtime, RemoteRuntime):  # decoded in the device's process
                if kind == "synthetic":  # its parameters checked here, as the source's constructor does
                    parse_synthetic_url(spec.url)
                stream.source = RemoteSource(stream, spec.url, kind)
            else:
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
            log.info("%d stream%s restored from %s", restored, "s" if restored != 1 else "",
                     self.store.folder if self.store else "?")
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
        as dropped). Not while the server starts: a pushed id taken then would push a saved or command-line camera
        of that id out (a viewer may push, only an operator may change cameras)."""
        validate_stream_id(stream_id)
        self.check_started()
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
        """Decode and letterbox a pushed frame (call from a worker thread), then hand it to the scheduler; a device in
        a process of its own gets the bytes and does that there (None: a bad image is answered with an error
        result whose drop_reason is 'invalid')."""
        rt = stream.runtime
        if isinstance(rt, RemoteRuntime):
            rt.push(stream, data, encoding, width, height, frame_id, capture_time_us, received_at)
            return None
        image, lb = decode_frame(data, encoding, width, height, stream.plan)
        return stream.put(image, lb, capture_time_us, frame_id=frame_id, ingest_time=received_at)

    def check_started(self) -> None:
        """UNAVAILABLE while the streams the server starts with are still being added (an unknown id may be one)."""
        if self.starting:
            raise UnavailableError("the server is starting and still adding its saved streams; retry in a moment"
                                   if self.store is not None else
                                   "the server is starting (its engines warming up, its cameras being added); retry "
                                   "in a moment")

    def _check_serving(self) -> None:
        if self.draining:
            raise UnavailableError("the server is shutting down")
        if not self.ready:
            raise UnavailableError("the server is still loading its engines; retry in a moment")

    def _register(self, stream_id: str, url: str, kind: str, max_fps: float, droppable: bool,
                  blind_after_s: float = 0.0) -> Stream:
        self._check_serving()
        with self._lock:  # registration and removal are one step each: an id re-added never meets its old self
            if stream_id in self._streams:
                raise StreamExistsError(f"stream {stream_id!r} already exists: remove it first or pick another id")
            pushed = kind == "push"  # cameras and Detect calls are counted apart: a viewer's calls take no camera's
            if sum((s.kind == "push") == pushed for s in self._streams.values()) >= self.config.max_streams:
                what = "Detect calls pushing frames" if pushed else "cameras"
                raise ResourceExhaustedError(f"stream limit reached ({self.config.max_streams} {what}; cameras and "
                                             "pushed streams count apart): remove a stream or start the server "
                                             "with a larger --max-streams")
            stream = Stream(stream_id, url, kind, max_fps, self.config.slo_s, self._on_ingest, self._drop,
                            self._on_reconnect, droppable=droppable, epoch=next(self._epochs),
                            on_corrupt=self._on_corrupt)
            stream.watch_picture(blind_after_s)  # before it is bound: a device process is told it then
            device = self.placement.assign(stream_id, max_fps, any_device=self.starting)  # saved ones kept
            stream.bind(self.runtimes[device])
            self._streams[stream_id] = stream
            if self.metrics is not None:
                self.metrics.add_stream(stream_id)
        return stream

    def remove_stream(self, stream_id: str, by_list: bool = False) -> StreamView:
        """Stop a stream and free what it held; NOT_FOUND if it is unknown. `by_list`: the camera list applied
        again (camera_list.py) removes it; else a camera of that list removed says it comes back with the list."""
        with self._lock:
            stream = self._streams.get(stream_id)
            if stream is None:
                self.check_owner(stream_id)  # another replica's camera: say which
                self.check_started()
                raise StreamNotFoundError(f"no stream {quote_id(stream_id)} (ListStreams shows the registered ids)")
            if by_list and not stream.listed:  # re-added over gRPC since the list was read: that one is not the list's
                raise StreamExistsError(f"stream {quote_id(stream_id)} was added over gRPC meanwhile: left running")
            self._unregister(stream, "removed")
        if stream.persistent:
            self._save_streams_logged()
        if stream.listed and not by_list:  # removed over gRPC: the list still holds it
            log.info("stream %s removed; it is in the camera list the server started with (--streams, --source): a "
                     "SIGHUP or a restart adds it again, unless it is taken out of that list", stream_id)
        else:
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
            if self.evidence is not None:
                self.evidence.forget(stream.stream_id)
            if self.metrics is not None:
                self.metrics.forget_stream(stream.stream_id)

    def _unbind(self, stream: Stream, reason: str) -> None:
        with self._lock:
            if isinstance(stream.runtime, RemoteRuntime) and not stream.droppable:
                stream.runtime.forget_pushes(stream.stream_id, stream.epoch)
            if stream.runtime is not None:
                for pending in stream.runtime.scheduler.remove_stream(stream.stream_id, stream.epoch):
                    self._drop(pending, reason)
            stream.close()
            if not stream.public:
                self.placement.release(stream.stream_id)

    def check_owner(self, stream_id: str) -> None:
        """WrongShardError naming the owner when another replica serves `stream_id` (--shard-count > 1)."""
        shard = self.config.shard
        if not shard.owns(stream_id):
            owner = shard.owner(stream_id)
            raise WrongShardError(f"stream {quote_id(stream_id)} belongs to shard {owner} of {shard.count}, not to "
                                  f"this server (shard {shard.index}): send it to replica {owner} (the Python client's "
                                  "ShardedClient routes by itself)", owner)

    def get_stream(self, stream_id: str) -> Stream:
        """The registered stream, or StreamNotFoundError."""
        with self._lock:
            stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamNotFoundError(f"no stream {quote_id(stream_id)} (ListStreams shows the registered ids)")
        return stream

    def snapshot(self, stream_id: str, timeout: float = SNAPSHOT_WAIT_S) -> tuple[bytes, int, int]:
        """GetSnapshot: the camera's next picture as (JPEG, width, height). NOT_FOUND for an unknown id,
        FAILED_PRECONDITION for a pushed stream (its client has the picture), UNAVAILABLE when no frame comes within
        `timeout` (a camera that is down: its state and last error say why)."""
        return self.picture(stream_id, timeout)[:3]

    def _evidence_picture(self, stream_id: str) -> Picture:
        jpeg, _, _, frame_id = self.picture(stream_id)
        return Picture(jpeg, frame_id)

    def picture(self, stream_id: str, timeout: float = SNAPSHOT_WAIT_S) -> tuple[bytes, int, int, int]:
        """The camera's next picture as (JPEG, width, height, frame id): `snapshot`, and the frame it shows."""
        with self._lock:
            stream = self._streams.get(stream_id)
        if stream is None:
            self.check_owner(stream_id)
            self.check_started()
            raise StreamNotFoundError(f"no stream {quote_id(stream_id)} (ListStreams shows the registered ids)")
        if stream.kind == "push":
            raise FailedPreconditionError(f"stream {stream_id!r} is pushed by a client (Detect): its pictures are the "
                                          "client's")
        runtime = stream.runtime
        if isinstance(runtime, RemoteRuntime):
            try:
                taken = runtime.snapshot(stream_id, stream.epoch, timeout)
            except EngineError as e:
                raise UnavailableError(f"{runtime.name}: {e}") from None
        else:
            try:
                local = stream.pictures.take(timeout)
            except PictureUnreadableError as e:
                raise UnavailableError(f"the picture of {stream_id!r} cannot be taken: {e}") from None
            taken = None if local is None else (encode_jpeg(local[0]), local[0].shape[1], local[0].shape[0], local[1])
        if taken is None:
            why = f": {stream.last_error}" if stream.last_error else ""
            raise UnavailableError(f"no frame came from {stream_id!r} in {timeout:g} s (it is {stream.state.name}"
                                   f"{why}); ListStreams shows its state")
        return taken

    def list_streams(self) -> list[StreamView]:
        """Snapshots of all registered streams, by id."""
        with self._lock:
            streams = sorted(self._streams.values(), key=lambda s: s.stream_id)
        return [s.view() for s in streams]

    def streams(self) -> list[Stream]:
        """The registered streams, by id (live objects: for the status summary)."""
        with self._lock:
            return sorted(self._streams.values(), key=lambda s: s.stream_id)

    def listed_specs(self) -> dict[str, StreamSpec]:
        """The command line's cameras running now (added with `listed`), by id, as they were asked for."""
        with self._lock:
            return {sid: s.spec for sid, s in self._streams.items() if s.listed and s.spec is not None}

    def has_stream(self, stream_id: str) -> bool:
        """True when a stream with this id is registered."""
        with self._lock:
            return stream_id in self._streams

    # ----------------------------------------------------------------------------------------- pipeline hooks
    def _on_ingest(self, stream: Stream) -> None:
        if not stream.droppable:  # a camera's frames are counted in its stats and added up at a scrape (sync_counts)
            self._count_ingest(stream)

    def _count_ingest(self, stream: Stream, n: int = 1) -> None:
        if self.metrics is not None and self._lookup(stream.stream_id, stream.epoch) is stream:  # not once removed
            self.metrics.series(stream.metrics_label, stream.device).frames.inc(n)

    def sync_counts(self) -> None:
        """Add what each camera offered, and had superseded, since the last call to its Prometheus counters (run
        before every scrape). Counted per frame only in the stream's stats: two counter increments a frame were
        a fifth of a camera tick, and past capacity ticks outnumber results four to one."""
        if self.metrics is None:
            return
        with self._lock:
            streams = [s for s in self._streams.values() if s.droppable]
        with self._sync_lock:
            for stream in streams:
                offered, superseded = stream.stats.counts()
                was_offered, was_superseded = stream.synced
                if offered > was_offered:
                    self.metrics.frames.labels(stream.metrics_label).inc(offered - was_offered)
                if superseded > was_superseded:
                    self.metrics.dropped(stream.metrics_label, "superseded").inc(superseded - was_superseded)
                stream.synced = (offered, superseded)

    def _drop(self, frame: Frame, reason: str) -> None:
        stream = self._lookup(frame.stream_id, frame.epoch)
        if stream is None:
            return  # removed meanwhile (maybe added again: a new stream): its series are gone too
        self._count_drop(stream, reason)
        if not frame.droppable:  # a push or DetectImage caller waits for this frame: answer it with the reason
            self._answer_drop(stream, frame.frame_id, frame.letterbox.src_hw, frame.capture_time_us,
                              frame.ingest_time, frame.public, frame.epoch, reason)

    def _answer_drop(self, stream: Stream, frame_id: int, src_hw: tuple[int, int], capture_time_us: int,
                     ingest_time: float, public: bool, epoch: int, reason: str) -> None:
        """The error result a pushed or DetectImage frame dropped before it ran is answered with."""
        why = "it could not run within the latency objective: the server is overloaded" if reason == "late" else reason
        self.fanout.publish(FrameResult(stream.stream_id, frame_id, np.zeros((0, 6), np.float32), src_hw,
                                        capture_time_us, now() - ingest_time, stream.device, public,
                                        error=f"frame dropped ({why})", epoch=epoch, drop_reason=reason))

    def _count_drop(self, stream: Stream, reason: str, n: int = 1) -> None:
        stream.stats.record_drop(reason, n)
        if self.metrics is not None and not (reason == "superseded" and stream.droppable):  # that one: sync_counts
            self.metrics.dropped(stream.metrics_label, reason).inc(n)

    def _on_reconnect(self, stream: Stream) -> None:
        if self.metrics is not None:
            self.metrics.reconnects.labels(stream.metrics_label).inc()

    def _on_corrupt(self, stream: Stream, n: int = 1) -> None:
        if self.metrics is not None:
            self.metrics.corrupt_packets.labels(stream.metrics_label).inc(n)

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
        if stream.filter.active and len(result.detections):  # the camera's own score, classes and zone (AddStream)
            names = self.class_names(result.model_version, result.device)
            result = dataclasses.replace(result, detections=stream.filter(result.detections, result.src_hw, names))
        confirmed: list[int] = []  # the classes of the objects this frame confirmed
        if stream.tracker is not None and not result.error:  # AddStream track: each object's id
            result, confirmed = self._track(stream, result)
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
                if len(result.detections):
                    self._count_detections(label, result)
                if confirmed:
                    names = self.class_names(result.model_version, result.device)
                    for c in confirmed:
                        self.metrics.counted(label, names.get(c, str(c))).inc()
        self.fanout.publish(result)

    def _track(self, stream: Stream, result: FrameResult) -> tuple[FrameResult, list[int]]:
        """`result` with its detections' track ids, and the classes of the objects it confirmed (with
        --evidence-dir, their pictures are asked for, and a picture waiting for this frame gets its boxes)."""
        names = self.class_names(result.model_version, result.device)
        starts = stream.filter.track_start_scores(result.detections, names, self.config.track_min_score)
        # at the frame's monotonic ingest time, not its wall-clock capture time: a clock step (NTP, a wrong RTC) would
        # forget every track (a step forwards: each part in sight counted again) or keep stale ones alive
        track_ids, new = stream.track(result.detections, result.ingest_time or now(), result.src_hw, starts)
        result = dataclasses.replace(result, track_ids=track_ids)
        confirmed = result.detections[new, 5].astype(int).tolist()
        evidence = self.evidence
        if evidence is not None:
            if confirmed:
                evidence.objects(stream.stream_id, track_ids[new].tolist(), confirmed, names)
            if stream.stream_id in evidence.pending:
                evidence.result(result)
        return result, confirmed

    def _count_detections(self, label: str, result: FrameResult) -> None:
        """yolov12_detections_total{stream, class}: one increment per class found in the frame (a Counter over the
        few class ids: ~3 us a frame of 3 detections on the AMD EPYC VM (2 cores), np.unique ~10)."""
        assert self.metrics is not None
        names = self.class_names(result.model_version, result.device)
        for c, n in collections.Counter(result.detections[:, 5].tolist()).items():
            self.metrics.detected(label, names.get(int(c), str(int(c)))).inc(n)

    def _on_subscriber_overflow(self, sub: Subscription, n: int) -> None:
        if self.metrics is not None:
            self.metrics.results_dropped.inc(n)
            if sub.label is not None:
                self.metrics.watcher_dropped(sub.label).inc(n)

    def open_watch(self, stream_ids: list[str] | None, loop: asyncio.AbstractEventLoop, peer: str = "",
                   batched: bool = False) -> Subscription:
        """A watcher's subscription (WatchDetections, or WatchDetectionBatches with `batched`: a queue of
        --batch-subscriber-queue results), named '<n> <peer>' in the per-watcher metrics until `close_watch`."""
        if self.draining:
            raise UnavailableError("the server is shutting down")
        label = f"{next(self._watch_ids)} {peer}".strip()
        size = self.config.batch_subscriber_queue if batched else self.config.subscriber_queue
        sub = self.fanout.subscribe(stream_ids, size, loop, label=label)
        if self.metrics is not None:
            self.metrics.add_watcher(label)
        return sub

    def close_watch(self, sub: Subscription) -> None:
        """End a watcher's subscription and forget its metric series."""
        self.fanout.unsubscribe(sub)
        if self.metrics is not None and sub.label is not None:
            self.metrics.forget_watcher(sub.label)

    # ----------------------------------------------------------------------------------------- watchdog, info
    def _watch(self) -> None:
        """Restart pulled sources that stopped delivering frames while STREAMING; refresh placement rates; start
        a re-check of each device out of service every `recheck_s` (in a probe thread: never on this one, so a
        hung re-check cannot stop stall detection)."""
        stall = self.config.rtsp.stall_s
        self.supervision_turned_at = now()  # (not since __init__: the engines took their time to load)
        while not self._stop.wait(min(0.25, stall / 4)):
            self.supervision_turned_at = now()
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
            s.restart_if_stalled(t, stall)
        self._rebalance(t)
        self.kill_silent_processes(t, max(2 * stall, 2.0))

    def live_snapshot(self) -> LiveSnapshot:
        """Streams by state, per-device queue depth, frames in flight and engine health, for the metrics scrape."""
        snap = LiveSnapshot()
        with self._lock:
            streams = list(self._streams.values())
        for s in streams:
            snap.streams_by_state[s.state.name] = snap.streams_by_state.get(s.state.name, 0) + 1
            snap.stream_states[s.stream_id] = s.state.name
            if s.droppable:  # cameras: pushed frames are the client's to look at
                snap.picture_problems[s.stream_id] = s.picture_problem
        for sub in self.fanout.subscriptions():
            if sub.label is not None:
                snap.watcher_queued[sub.label] = len(sub)
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
                                           fault.error if fault is not None else "", rt.version,
                                           getattr(rt, "pid", 0)))
        return ServerInfoView(
            __version__, [(rt.engine_path, rt.name, rt.engine.info, rt.loaded.instances, rt.version) for rt in rts],
            list(self.runtimes), names, tuple(info.imgsz), self.config.slo_ms,
            max((rt.max_batch for rt in rts), default=self.config.max_batch), self.config.max_streams,
            self.config.process_late, status)

    def class_name(self, class_id: int, device: str | None = None) -> str:
        """The class name for an id from the engine of `device` (or the first one)."""
        rt = self.runtimes.get(device or "") or next(iter(self.runtimes.values()), None)
        return rt.engine.info.names.get(class_id, str(class_id)) if rt else str(class_id)
