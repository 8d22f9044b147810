"""Server configuration (one dataclass the CLI fills) and validation of stream ids, URLs and streams files."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from .allowlist import CameraPolicy
from .errors import ConfigError, InvalidArgumentError
from .filters import DetectionFilter, check_class_scores, check_classes, check_zone
from .mqtt import MqttOptions
from .opcua import OpcUaOptions
from .security import SecurityConfig
from .sharding import ShardSpec
from .urls import expand_credentials, redact_text, stray_userinfo
from .urls import redact_url as _redact_url

__all__ = ["DECODE_MODES", "MAX_FPS", "MAX_ID_LEN", "MAX_INSTANCES", "MAX_THREADS", "MAX_URL_LEN", "MIN_FPS",
           "PULL_SCHEMES", "STREAM_KEYS", "WORKER_PROCESSES", "RtspOptions", "ServerConfig", "StreamSpec",
           "load_streams_file", "quote_id", "redact_url", "scrub_url", "url_kind", "validate_stream_id"]

MAX_ID_LEN = 128
STREAM_KEYS = ("id", "url", "max_fps", "min_score", "class_min_scores", "classes", "zone", "blind_after_s", "track",
               "credentials")  # what a streams file's entry may hold (`stream_id` for `id` too); the helps list them
MAX_URL_LEN = 2048  # a camera URL is saved, listed and logged at each reconnect: 17 MB ones made ListStreams fail
MAX_INSTANCES = 64  # engine instances per device (--instances): each holds the engine's weights and buffers
MAX_THREADS = 256  # intra-op threads per instance (--threads)
MIN_FPS, MAX_FPS = 0.001, 1000.0  # a max_fps other than 0 (every frame): one frame per 1,000 s .. 1,000 a second
DECODE_MODES = ("cpu", "nvdec", "auto")  # where pulled video is decoded: sources/hwdecode.py
PULL_SCHEMES = ("rtsp", "rtsps", "synthetic")
WORKER_PROCESSES = ("auto", "on", "off")  # --worker-processes
_ID_RE = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no whitespace
_HOST_RE = re.compile(r"^[A-Za-z0-9._~-]+$")  # a host name or IPv4 address (IPv6 ones come in brackets)


@dataclass
class RtspOptions:
    """How pulled cameras are opened and kept alive (timeouts, reconnect backoff, stall watchdog)."""

    open_timeout_s: float = 5.0  # connect + describe + first packets
    read_timeout_s: float = 5.0  # one blocking read; a silent server raises after this
    stall_s: float = 5.0  # watchdog: STREAMING without a new frame this long -> reconnect
    blind_after_s: float = 30.0  # a picture blank or frozen this long is reported (0: never; picture_check.py)
    backoff_base_s: float = 0.5  # first retry delay; doubles per failure, with jitter
    backoff_cap_s: float = 30.0
    decode: str = "cpu"  # 'cpu', 'nvdec' (the GPU's video decoder, CPU fallback) or 'auto' (nvdec on GPU devices)
    hosts: CameraPolicy | None = None  # checks the camera's host at every connection (allowlist.py); None: no check

    def __post_init__(self) -> None:
        if self.decode not in DECODE_MODES:
            raise ConfigError(f"--decode {self.decode!r}: use one of {', '.join(DECODE_MODES)}")


@dataclass
class ServerConfig:
    """Everything `yolov12-serve` is told on the command line; `ServerCore` takes one of these."""

    engines: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 9464  # 0: any free port; negative: no metrics endpoint
    slo_ms: float = 45.0
    instances: int = 2  # engine instances (sessions / execution contexts) per device, used concurrently
    threads: int | None = None  # intra-op threads per instance (CPU); None: cores // instances
    max_batch: int = 8
    max_streams: int = 64
    process_late: bool = False  # process frames that can no longer meet the SLO instead of dropping them
    track_min_score: float = 0.5  # on tracked cameras, the score a detection needs to start an object (tracking.py)
    evidence_dir: str | None = None  # a picture of each object tracked cameras count goes here (evidence.py)
    evidence_max_mb: float = 1024.0  # the evidence folder's size cap: the oldest pictures go first
    mqtt: MqttOptions | None = None  # detections, objects and camera states published to a broker (mqtt.py)
    opcua: OpcUaOptions | None = None  # an OPC UA server of camera states and object counts for PLCs (opcua.py)
    allow_files: bool = False  # accept file paths as stream URLs (off: a client could read server files)
    allow_synthetic: bool = False  # accept synthetic:// demo cameras (--allow-synthetic, --demo): ~250 MB each
    allow_hosts: tuple[str, ...] = ()  # networks and names cameras may be at (empty: all but link-local, metadata)
    metrics_host: str | None = None  # where /metrics listens (None: the gRPC --host)
    health_port: int | None = None  # grpc.health.v1 alone, plaintext, on this port too (None: not; healthport.py)
    security: SecurityConfig = field(default_factory=SecurityConfig)  # TLS, tokens, reflection (security.py)
    max_message_bytes: int = 32 * 1024 * 1024
    subscriber_queue: int = 64  # results buffered per WatchDetections client before its oldest are dropped
    batch_subscriber_queue: int = 8192  # the same per WatchDetectionBatches client (about 1.3 s at 6,400 results/s)
    watch_batch_ms: float = 5.0  # WatchDetectionBatches: at most one message per this long (unless a client asks)
    background_batch: bool = True  # every thread but inference (gRPC, sources, metrics) under SCHED_BATCH (priority.py)
    background_nice: int = 0  # and at this nice value (0: the default)
    run_deadline_floor_s: float = 2.0  # an engine run is hung after max(this, factor x its expected slow run)
    run_deadline_factor: float = 10.0
    recheck_s: float = 10.0  # how often a device out of service has its engine re-checked
    failures_before_unhealthy: int = 3  # batches failing in a row before a device is taken out of service
    state_dir: str | None = None  # where the streams added over gRPC are kept across restarts (None: nowhere)
    max_pending_images: int = 32  # DetectImage calls being decoded, waiting or running at once; more: refused
    max_concurrent_rpcs: int = 256  # gRPC calls at once (watchers and Detect calls included); more: refused
    max_calls_per_client: int | None = None  # watch / Detect calls open per client address (None: the above less 8)
    rebalance_s: float = 10.0  # a device over capacity this long gives a stream to a less loaded one (0: never)
    worker_processes: str = "auto"  # a process per device: on, off, auto (on for two or more devices: `processes`)
    engine_loader: str | None = None  # 'module:function' device processes open engines with (tests: faults)
    rtsp: RtspOptions = field(default_factory=RtspOptions)
    shard: ShardSpec = field(default_factory=ShardSpec)  # which cameras this replica serves (sharding.py)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.slo_ms) and self.slo_ms > 0):
            raise ConfigError(f"--slo-ms must be a positive number, got {self.slo_ms}")
        for name in ("instances", "max_batch", "max_streams", "subscriber_queue", "batch_subscriber_queue",
                     "max_pending_images", "max_concurrent_rpcs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_calls_per_client is not None and self.max_calls_per_client < 1:
            raise ConfigError(f"--max-calls-per-client must be at least 1, got {self.max_calls_per_client}")
        if self.instances > MAX_INSTANCES:  # 100,000 took every byte of memory before failing
            raise ConfigError(f"--instances must be at most {MAX_INSTANCES} (each holds a copy of the engine), got "
                              f"{self.instances}")
        if self.threads is not None and self.threads > MAX_THREADS:
            raise ConfigError(f"--threads must be at most {MAX_THREADS} per instance, got {self.threads}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be 0..65535 (0: any free port), got {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port must be -1..65535 (0: any free port, -1: off), got {self.metrics_port}")
        if self.health_port is not None and not 0 <= self.health_port <= 65535:
            raise ConfigError(f"--health-port must be 0..65535 (0: any free port), got {self.health_port}")
        if not 0 <= self.background_nice <= 19:
            raise ConfigError(f"--background-nice must be 0..19 (0: the default priority), "
                              f"got {self.background_nice}")
        if self.run_deadline_floor_s <= 0 or self.run_deadline_factor < 1:
            raise ConfigError(f"--run-deadline-s must be positive and --run-deadline-factor at least 1, got "
                              f"{self.run_deadline_floor_s} and {self.run_deadline_factor}")
        if not 1 <= self.watch_batch_ms <= 1000:
            raise ConfigError(f"--watch-batch-ms must be 1..1000, got {self.watch_batch_ms}")
        if self.recheck_s <= 0:
            raise ConfigError(f"--recheck-s must be positive, got {self.recheck_s}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")
        if not self.devices:
            raise ConfigError("no device to run on: pass --gpus cpu or a GPU list such as --gpus 0,1")
        if self.worker_processes not in WORKER_PROCESSES:
            raise ConfigError(f"--worker-processes {self.worker_processes!r}: use one of {', '.join(WORKER_PROCESSES)}")
        self.rtsp = replace(self.rtsp, hosts=self.camera_policy)  # every connection checks its host again

    @functools.cached_property
    def camera_policy(self) -> CameraPolicy:
        """Which camera URLs and hosts are accepted (allowlist.py); ConfigError for a bad --allow-hosts entry."""
        return CameraPolicy(self.allow_hosts, self.allow_synthetic, self.allow_files)

    @property
    def processes(self) -> bool:
        """Whether each device runs in a process of its own (procs/). `auto`: with two or more devices (GPUs, or
        `--gpus cpu:N`). Measured on 2 cores with a zero-cost model (bench/README.md, host path): within one
        process's ceiling both layouts cost about the same CPU per frame and deliver everything; past it `cpu:2`
        in processes carries more frames on the same cores (docs/architecture.md has the figures). One device has
        nothing to split per device: it stays in the server's process."""
        if self.worker_processes == "auto":
            return len(self.devices) >= 2
        return self.worker_processes == "on"

    @property
    def slo_s(self) -> float:
        """The SLO in seconds."""
        return self.slo_ms / 1000.0


@dataclass(frozen=True)
class StreamSpec:
    """A camera to pull: its id, URL, optional frame-rate cap (0: every frame), and what of its detections is
    published (filters.py): the lowest score (0: all the engine returns: a line's own threshold without exporting
    the model again), the classes (empty: all) and the zone their box centres must lie in (empty: the frame)."""

    stream_id: str
    url: str
    max_fps: float = 0.0
    min_score: float = 0.0
    classes: tuple[str, ...] = ()
    zone: tuple[tuple[float, float], ...] = ()  # polygon corners (x, y) as fractions of the frame's width, height
    blind_after_s: float | None = None  # its own --blind-after-s (0: never); None: the server's
    track: bool = False  # follow each object: track ids on its detections, objects counted (tracking.py)
    class_min_scores: tuple[tuple[str, float], ...] = ()  # (class name, its own min_score); a mapping is taken too

    def __post_init__(self) -> None:
        if not (self.max_fps == 0 or MIN_FPS <= self.max_fps <= MAX_FPS):  # NaN fails this too
            raise InvalidArgumentError(f"max_fps must be 0 (every frame) or {MIN_FPS:g}..{MAX_FPS:g} frames a second, "
                                       f"got {self.max_fps:g}")
        if not 0.0 <= self.min_score <= 1.0:  # NaN fails this too
            raise InvalidArgumentError(f"min_score must be 0..1 (0: every detection), got {self.min_score}")
        if self.blind_after_s is not None and not (math.isfinite(self.blind_after_s) and self.blind_after_s >= 0):
            raise InvalidArgumentError(f"blind_after_s must be >= 0 (0: never check the picture), got "
                                       f"{self.blind_after_s}")
        object.__setattr__(self, "classes", check_classes(self.classes))
        object.__setattr__(self, "zone", check_zone(self.zone))
        object.__setattr__(self, "class_min_scores", check_class_scores(self.class_min_scores))

    def detection_filter(self) -> DetectionFilter:
        """What of this camera's detections is published."""
        return DetectionFilter(self.min_score, self.classes, self.zone, self.class_min_scores)

    def check_known_classes(self, known: Collection[str]) -> None:
        """InvalidArgumentError for a class in `classes` or `class_min_scores` that the model (`known`, its class
        names) does not have: a typo would publish nothing."""
        unknown = [c for c in [*self.classes, *(n for n, _ in self.class_min_scores)] if c not in known]
        if unknown:
            shown = sorted(known)
            listed = ", ".join(shown[:40]) + (f", ... ({len(shown)} in all)" if len(shown) > 40 else "")
            raise InvalidArgumentError(f"unknown classes {unknown} for stream {self.stream_id}: the model's classes "
                                       f"are {listed or '(none)'}")


def validate_stream_id(stream_id: str) -> str:
    """Return `stream_id` or raise InvalidArgumentError: 1..128 printable ASCII characters without whitespace."""
    if not stream_id:
        raise InvalidArgumentError("stream_id is empty: give each stream a short unique name such as 'line1-cam3'")
    if len(stream_id) > MAX_ID_LEN:
        raise InvalidArgumentError(f"stream_id is {len(stream_id)} characters long; the limit is {MAX_ID_LEN}")
    if not _ID_RE.match(stream_id):
        raise InvalidArgumentError(f"stream_id {stream_id!r} may only hold printable ASCII without spaces")
    return stream_id


def quote_id(stream_id: str) -> str:
    """`stream_id` quoted for a message, cut to MAX_ID_LEN characters (a request's id may be megabytes long, and
    an error's text travels in a gRPC trailer of at most 16 KB)."""
    if len(stream_id) <= MAX_ID_LEN:
        return repr(stream_id)
    return f"{stream_id[:MAX_ID_LEN]!r}... ({len(stream_id)} characters)"


def url_kind(url: str, allow_files: bool = False) -> str:
    """Classify a stream URL as 'rtsp', 'synthetic' or 'file', or raise InvalidArgumentError saying what is accepted."""
    if not url or not url.strip():
        raise InvalidArgumentError("url is empty: give an rtsp:// or rtsps:// address")
    if len(url) > MAX_URL_LEN:
        raise InvalidArgumentError(f"url is {len(url)} characters long; the limit is {MAX_URL_LEN} (it begins "
                                   f"{redact_url(url[:60])!r})")
    if any(c.isspace() for c in url):
        raise InvalidArgumentError(f"url {redact_url(url)!r} contains whitespace")
    if any(ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0 for c in url):
        raise InvalidArgumentError(f"url {redact_url(url)!r} contains control characters")
    head, sep, rest = url.partition("://")
    if sep and head.lower() in ("rtsp", "rtsps") and stray_userinfo(rest):
        raise InvalidArgumentError(f"url {redact_url(url)!r}: an '@' after the host: write a / ? # or @ in a password "
                                   "as %2F %3F %23 %40 (and an @ in a path as %40)")
    try:
        parts = urlsplit(url)
        parts.hostname  # noqa: B018 - raises ValueError on a malformed host ('[::1' or bad IDNA)
    except ValueError as e:
        raise InvalidArgumentError(f"url {redact_url(url)!r} is malformed: {e}") from None
    scheme = parts.scheme.lower()
    if scheme in ("rtsp", "rtsps"):
        if not parts.hostname:
            raise InvalidArgumentError(f"url {redact_url(url)!r} has no host: use rtsp://HOST[:PORT]/PATH")
        if not parts.hostname.isascii():
            raise InvalidArgumentError(f"url {redact_url(url)!r}: write a non-ASCII host name in its ASCII "
                                       "(punycode, xn--...) form")
        if "[" not in parts.netloc and not _HOST_RE.match(parts.hostname):
            raise InvalidArgumentError(f"url {redact_url(url)!r}: the host {parts.hostname!r} holds characters no "
                                       "host name has (use rtsp://HOST[:PORT]/PATH, with / before the path)")
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as e:
            raise InvalidArgumentError(f"url {redact_url(url)!r}: {e}") from None
        return "rtsp"
    if scheme == "synthetic":
        return "synthetic"
    if scheme == "file" or not scheme:
        if not allow_files:
            raise InvalidArgumentError(f"file sources are disabled: {redact_url(url)!r} (start the server with "
                                  "--allow-files to accept local video files)")
        return "file"
    raise InvalidArgumentError(f"unsupported url {redact_url(url)!r}: use rtsp://, rtsps://, synthetic://NAME, "
                          "or a file path with --allow-files")


def redact_url(url: str) -> str:
    """The URL with its password and credential parameters replaced by '***' (safe to log and return to clients;
    urls.py: one masking for the whole server)."""
    return _redact_url(url)


def scrub_url(text: str, url: str) -> str:
    """`text` (an error message, mostly FFmpeg's, that may quote the URL) with `url`'s password masked."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return text
    if not password:
        return text
    return text.replace(url, redact_url(url)).replace(f":{password}@", ":***@")


def load_streams_file(path: str | Path) -> list[StreamSpec]:
    """Read a YAML list of cameras (`streams: [{id, url, max_fps, min_score, class_min_scores, classes, zone,
    blind_after_s, track, credentials}]`, or a bare list); one clear error per mistake. URLs may hold `${VAR}` (from
    the environment) and `credentials: FILE` names a file holding `USER:PASSWORD` (relative to the list's folder), so
    that the list itself holds no secret (urls.py)."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read streams file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"streams file {path} is not a text file (a YAML list of cameras: id, url, ...)") from None
    except yaml.YAMLError as e:  # its str() spans lines with a caret drawing: keep where and what
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"streams file {path} is not valid YAML{where}: {what}") from None
    items = doc.get("streams") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise ConfigError(f"streams file {path}: expected 'streams:' followed by a list of {{id, url}} entries")
    specs: list[StreamSpec] = []
    for i, item in enumerate(items):
        where = f"streams file {path}, entry {i + 1}"
        if not isinstance(item, dict) or "url" not in item:
            raise ConfigError(f"{where}: expected a mapping with 'id' and 'url', got {redact_text(repr(item))}")
        unknown = set(item) - {*STREAM_KEYS, "stream_id"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (allowed: {', '.join(STREAM_KEYS)})")
        sid = str(item.get("id", item.get("stream_id", f"cam{i}")))
        try:
            max_fps = float(item.get("max_fps", 0) or 0)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: max_fps must be a number, got {item['max_fps']!r}") from None
        try:
            min_score = float(item.get("min_score", 0) or 0)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: min_score must be a number, got {item['min_score']!r}") from None
        try:
            blind_after_s = None if item.get("blind_after_s") is None else float(item["blind_after_s"])
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: blind_after_s must be a number, got {item['blind_after_s']!r}") from None
        class_scores = item.get("class_min_scores") or {}
        try:
            if not isinstance(class_scores, dict):
                raise TypeError
            class_scores = {str(k): float(v) for k, v in class_scores.items()}
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: class_min_scores must map class names to scores, e.g. {{dent: 0.3}}, got "
                              f"{item['class_min_scores']!r}") from None
        track = item.get("track", False)
        if not isinstance(track, bool):
            raise ConfigError(f"{where}: track must be true or false, got {track!r}")
        classes, zone = item.get("classes") or [], item.get("zone") or []
        if isinstance(classes, str):
            classes = [classes]
        if not isinstance(classes, list):
            raise ConfigError(f"{where}: classes must be a list of class names, got {classes!r}")
        try:
            if not isinstance(zone, list) or not all(isinstance(p, list) and len(p) == 2 for p in zone):
                raise TypeError
            zone = [(float(x), float(y)) for x, y in zone]
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: zone must be a list of [x, y] points (fractions of the frame, 0..1), "
                              f"got {item['zone']!r}") from None
        try:
            validate_stream_id(sid)
        except InvalidArgumentError as e:
            raise ConfigError(f"{where}: {e}") from None
        url = expand_credentials(str(item["url"]), f"{where} ({sid})", item.get("credentials"), base=path.parent)
        try:
            specs.append(StreamSpec(sid, url, max_fps, min_score, tuple(str(c) for c in classes), tuple(zone),
                                    blind_after_s, track, tuple(class_scores.items())))
        except InvalidArgumentError as e:
            raise ConfigError(f"{where}: {e}") from None
    ids = [s.stream_id for s in specs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"streams file {path}: duplicate ids {dup}")
    return specs
