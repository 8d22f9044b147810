"""`yolov12-serve`: parse the command line into a ServerConfig and run the server (exit 2 with one line on bad input).

    yolov12-serve --demo                                   # bundled model, 4 synthetic cameras, live table
    yolov12-serve --engines s.onnx --gpus cpu --source rtsp://cam1/stream --source rtsp://cam2/stream
    yolov12-serve --engines s0.engine,s1.engine --gpus 0,1 --streams cameras.yaml --slo-ms 45
    yolov12-serve --engines s.onnx --streams cameras.yaml --allow-hosts 10.1.0.0/16 --auth-token-file tokens
                  --tls-cert server.crt --tls-key server.key       # on a plant network: docs/security.md
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import sys
from pathlib import Path

from . import __version__
from .argparsing import OneLineParser
from .config import (
    DECODE_MODES,
    STREAM_KEYS,
    WORKER_PROCESSES,
    RtspOptions,
    ServerConfig,
    StreamSpec,
    load_streams_file,
    url_kind,
)
from .errors import ConfigError, InvalidArgumentError, PermissionDeniedError, ServerError
from .mqtt import MqttOptions, client_tls_context
from .opcua import OpcUaOptions, check_installed, load_identity, load_trust, load_users
from .security import SecurityConfig, install_log_redaction
from .sharding import ShardSpec
from .sparkplug import resolve as resolve_sparkplug
from .tls import TlsFiles
from .urls import expand_credentials, redact_text

__all__ = ["build_parser", "main", "parse_config"]

STATUS_TO_A_LOG_S = 30.0  # --status into a file, journal or container log: a table this often (a terminal: 1 s)
EVIDENCE_MAX_MB = 1024.0  # --evidence-max-mb when not given (its parser default is None: given alone, it is refused)
# flags whose parser default is None so that giving one is told apart from leaving it out, with the value a start
# uses when it is left out (docs/serving.md states these; a test holds the two together)
DEFAULTS_WHEN_LEFT_OUT = {"--evidence-max-mb": EVIDENCE_MAX_MB}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (names are a contract: docs/serving.md lists them)."""
    p = OneLineParser(prog="yolov12-serve", description="Real-time multi-camera YOLOv12 detection server "
                                "(gRPC in and out, Prometheus metrics).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--engines", help="engine file(s): one for all devices or one per device, comma-separated "
                   "(.onnx: ONNX Runtime; .engine/.plan: TensorRT; .pt: PyTorch)")
    p.add_argument("--gpus", help="'cpu', 'cpu:N' (N CPU devices sharing the cores), a list '0,2' or a range '0-3' "
                   "(default: all visible GPUs, else cpu; cpu for .onnx engines where ONNX Runtime has no CUDA "
                   "provider)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port; default 50051)")
    p.add_argument("--metrics-port", type=int, default=9464,
                   help="Prometheus /metrics port (0: any free port, -1: off; default 9464)")
    p.add_argument("--slo-ms", type=float, default=45.0, help="latency objective, ingest to publish (default 45)")
    p.add_argument("--worker-processes", choices=WORKER_PROCESSES, default="auto",
                   help="a process per device (its engine, scheduler and camera decoders; the API process keeps "
                   "gRPC, placement, metrics): on, off, or auto (default: on for two or more devices)")
    p.add_argument("--instances", type=int, default=2, help="engine instances per device, run concurrently (default 2)")
    p.add_argument("--threads", type=int, help="CPU threads per instance (default: cores / instances)")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch (capped by the engine's; default 8)")
    p.add_argument("--max-streams", type=int, default=64,
                   help="cameras at most (default 64); as many Detect calls pushing frames, counted apart")
    p.add_argument("--streams", metavar="FILE.yaml",
                   help=f"cameras to add at start: 'streams: [{{{', '.join(STREAM_KEYS)}}}]' (docs/production.md); "
                        "SIGHUP applies the edited file")
    p.add_argument("--source", action="append", default=[], metavar="URL",
                   help="a camera to add at start (repeatable); ids cam0, cam1, ...")
    p.add_argument("--demo", action="store_true",
                   help="the embedded default: bundled model (unless --engines), 4 synthetic cameras (unless "
                   "--streams or --source), live table")
    p.add_argument("--duration", type=float, help="stop after this many seconds and print a summary")
    p.add_argument("--process-late", action="store_true",
                   help="run frames that can no longer meet the SLO instead of dropping them as 'late'")
    p.add_argument("--allow-files", action="store_true",
                   help="accept local video files as stream URLs (played like cameras: real-time pace, looped)")
    p.add_argument("--decode", choices=DECODE_MODES, default="cpu",
                   help="where camera video is decoded: cpu (default), nvdec (the GPU's video decoder, falling back "
                   "to the CPU where it is unavailable) or auto (nvdec for streams served on a GPU)")
    p.add_argument("--status", action=argparse.BooleanOptionalAction, default=None,
                   help="show the live status table, every second on a terminal, every 30 s into a log (default: "
                   "on with --demo on a terminal)")
    p.add_argument("--subscriber-queue", type=int, default=64,
                   help="results buffered per WatchDetections client before its oldest are dropped (default 64)")
    p.add_argument("--batch-subscriber-queue", type=int, default=8192,
                   help="results buffered per WatchDetectionBatches client (the Python client's watch) before its "
                   "oldest are dropped (default 8192)")
    p.add_argument("--watch-batch-ms", type=float, default=5.0,
                   help="WatchDetectionBatches sends at most one message per this many ms, each with every result "
                   "since the last (default 5; a client may ask for another)")
    p.add_argument("--background-batch", action=argparse.BooleanOptionalAction, default=True,
                   help="run every thread but inference (gRPC, cameras, metrics) under Linux's SCHED_BATCH: they "
                        "never preempt an engine run when they wake (default: on)")
    p.add_argument("--background-nice", type=int, default=0,
                   help="CPU priority (nice) of those threads too, 0..19 (default 0)")
    p.add_argument("--max-message-mb", type=float, default=32.0, help="largest gRPC message (default 32 MB)")
    p.add_argument("--stall-s", type=float, default=5.0, help="reconnect a camera silent this long (default 5)")
    p.add_argument("--backoff-cap-s", type=float, default=30.0, help="longest wait between reconnects (default 30)")
    p.add_argument("--blind-after-s", type=float, default=30.0,
                   help="report a camera whose picture stays blank (covered, dark, dead sensor) or frozen (the same "
                   "frame again and again) this long, though frames keep coming (default 30; 0: never)")
    p.add_argument("--track-min-score", type=float, default=0.5, metavar="S",
                   help="on cameras added with track, the score a detection needs to start an object (weaker ones "
                   "only continue one: a model's weak duplicate boxes are not counted as parts; default 0.5)")
    p.add_argument("--evidence-dir", metavar="DIR",
                   help="write a picture of every object a tracked camera counts, its box drawn, with a JSON record "
                   "(DIR/CAMERA/TIME_CLASS_ID.jpg and .json): the quality record of each defect")
    p.add_argument("--evidence-max-mb", type=float, default=None, metavar="MB",
                   help=f"the evidence folder's cap: the oldest pictures are removed past it, with --evidence-dir "
                   f"(default {EVIDENCE_MAX_MB:g})")
    p.add_argument("--mqtt", metavar="URL",
                   help="also publish to this MQTT broker, mqtt://[USER@]HOST[:PORT][/PREFIX] (mqtts:// for TLS; "
                   "${VAR} taken from the environment): PREFIX/CAMERA/detections, /objects (tracked cameras, each "
                   "object once), /state (retained) and PREFIX/status online/offline (default prefix yolov12)")
    p.add_argument("--mqtt-credentials", metavar="FILE",
                   help="a file holding USER:PASSWORD for the broker (kept off the command line); reloaded on SIGHUP")
    p.add_argument("--mqtt-ca", metavar="FILE", help="CA certificate the mqtts:// broker's is checked with "
                   "(default: the system's)")
    p.add_argument("--mqtt-cert", metavar="FILE", help="client certificate shown to an mqtts:// broker that wants "
                   "one (mosquitto's require_certificate, AWS IoT Core), with --mqtt-key; reloaded on SIGHUP")
    p.add_argument("--mqtt-key", metavar="FILE", help="the unencrypted private key of --mqtt-cert")
    p.add_argument("--mqtt-client-id", metavar="ID", help="the MQTT client id, where the broker's rules name it "
                   "(AWS IoT: the thing name); unique per server, or the broker drops the older connection "
                   "(default: yolov12- and a hash unique to the process)")
    p.add_argument("--mqtt-detections", action=argparse.BooleanOptionalAction, default=True,
                   help="publish every result with detections (about 0.3 ms of CPU each: 1,600 a second take half a "
                   "core); --no-mqtt-detections: objects and states only (default: on)")
    p.add_argument("--mqtt-sparkplug", metavar="GROUP[/EDGE_NODE]",
                   help="speak Sparkplug B on the --mqtt connection instead of the JSON topics (the connection has "
                   "one last will: Sparkplug's NDEATH): Ignition and other Sparkplug host applications find the "
                   "server as edge node EDGE_NODE of group GROUP and each camera as a device, its values as tags "
                   "(default edge node: the host name, or yolov12-serve-I for replica I of --shard-count N)")
    p.add_argument("--mqtt-queue", type=int, default=10000, metavar="N",
                   help="objects and states held while the broker is away; more are dropped, counted (default "
                   "10000)")
    p.add_argument("--opcua", metavar="URL",
                   help="also serve OPC UA for PLCs and SCADA at opc.tcp://HOST:PORT (e.g. opc.tcp://0.0.0.0:4840): "
                   "the server's status, each camera's state, rates and, on tracked cameras, object counts and the "
                   "last object, read-only (needs asyncua: pip install \".[opcua]\")")
    p.add_argument("--opcua-cert", metavar="FILE", help="the OPC UA application certificate (RSA, PEM or DER, its "
                   "application URI in a URI subjectAltName), with --opcua-key: only encrypted sessions "
                   "(Basic256Sha256 Sign, SignAndEncrypt) are served; reloaded on SIGHUP")
    p.add_argument("--opcua-key", metavar="FILE", help="the unencrypted RSA private key of --opcua-cert")
    p.add_argument("--opcua-trust", metavar="FILE|DIR", help="the OPC UA clients served (with --opcua-cert): a "
                   "certificate file or a folder of them, CAs (what they signed is trusted) and clients' own "
                   "certificates (default: any client with a certificate); reloaded on SIGHUP")
    p.add_argument("--opcua-users", metavar="FILE", help="OPC UA sessions log in with a user name and password of "
                   "this file (with --opcua-cert; one NAME:HASH a line, made by `python -m yolov12_serve.opcua_users "
                   "NAME`), anonymous ones are refused (default: anonymous); reloaded on SIGHUP")
    p.add_argument("--shard-count", type=int, metavar="N",
                   help="replicas sharing the cameras (default 1): this one serves only the cameras whose ids "
                   "hash to its --shard-index (rendezvous hashing), others are refused with FAILED_PRECONDITION")
    p.add_argument("--shard-index", type=int, metavar="I",
                   help="this replica's shard, 0..N-1 (default: the ordinal ending the pod name, $POD_NAME or the "
                   "host name, as a Kubernetes StatefulSet names its pods)")
    p.add_argument("--run-deadline-s", type=float, default=2.0,
                   help="an engine run is declared hung (the device taken out of service, its streams moved) after "
                        "max(this, --run-deadline-factor x its expected slow run) (default 2)")
    p.add_argument("--run-deadline-factor", type=float, default=10.0,
                   help="multiple of a batch's expected slow (p90) run time it may take before it is hung (default 10)")
    p.add_argument("--recheck-s", type=float, default=10.0,
                   help="how often the engine of a device out of service is tried again (default 10)")
    p.add_argument("--max-pending-images", type=int, default=32,
                   help="DetectImage calls served at once; more are refused with RESOURCE_EXHAUSTED (default 32)")
    p.add_argument("--max-concurrent-rpcs", type=int, default=256,
                   help="gRPC calls at once, watchers and Detect calls included; more are refused with "
                        "RESOURCE_EXHAUSTED (default 256)")
    p.add_argument("--max-calls-per-client", type=int, default=None, metavar="N",
                   help="watch and Detect calls one client address may hold open; more are refused with "
                        "RESOURCE_EXHAUSTED (default: --max-concurrent-rpcs less 8, left for health checks and "
                        "operators)")
    p.add_argument("--rebalance-s", type=float, default=10.0,
                   help="a device whose cameras offer more frames than it can run for this long hands one to a less "
                        "loaded device (0: never; default 10)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="where the streams added over gRPC are kept, so that a restart brings them back (default: "
                        "$XDG_STATE_HOME/yolov12-serve, else ~/.local/state/yolov12-serve)")
    p.add_argument("--no-state", action="store_true", help="keep no stream set: a restart forgets streams added "
                   "over gRPC")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="the least severe log lines shown (default INFO)")
    p.add_argument("--check", action="store_true",
                   help="check the configuration and exit, starting nothing (it can run beside the server, as the "
                   "server's user): the flags, streams file, certificates, keys and tokens, the engine files' "
                   "metadata and the cameras' classes, the state and evidence folders; exit 0 with what a start "
                   "would use, or 2 with one line saying what would stop it")
    _add_security_flags(p)
    return p


def _mqtt_options(args: argparse.Namespace, shard: ShardSpec) -> MqttOptions | None:
    """--mqtt and its options (None without it); ConfigError for what cannot work."""
    if args.mqtt is None:
        for flag in ("mqtt_credentials", "mqtt_ca", "mqtt_cert", "mqtt_key", "mqtt_client_id", "mqtt_sparkplug"):
            if getattr(args, flag) is not None:
                raise ConfigError(f"--{flag.replace('_', '-')} is for --mqtt: give the broker's URL too")
        return None
    for flag in ("mqtt_ca", "mqtt_cert", "mqtt_key"):
        path = getattr(args, flag)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"--{flag.replace('_', '-')} {path}: no such file")
    sparkplug = None
    if args.mqtt_sparkplug is not None:
        sparkplug = resolve_sparkplug(args.mqtt_sparkplug, shard.index if shard.count > 1 else None)
    options = MqttOptions(expand_credentials(args.mqtt, "--mqtt", args.mqtt_credentials), args.mqtt_ca,
                          args.mqtt_queue, args.mqtt_detections, args.mqtt_cert, args.mqtt_key, args.mqtt_client_id,
                          args.mqtt_credentials, sparkplug)
    if options.tls:
        client_tls_context(options)  # the certificate files checked now, not after the engines loaded
    return options


def _opcua_options(args: argparse.Namespace) -> OpcUaOptions | None:
    """--opcua and its options (None without it); ConfigError for what cannot work: asyncua not installed, a bad URL,
    certificate or key files that cannot serve Basic256Sha256, a trust file that holds no certificate, a users file
    that cannot be used."""
    if args.opcua is None:
        for flag in ("opcua_cert", "opcua_key", "opcua_trust", "opcua_users"):
            if getattr(args, flag) is not None:
                raise ConfigError(f"--{flag.replace('_', '-')} is for --opcua: give the endpoint's URL too")
        return None
    options = OpcUaOptions(args.opcua, args.opcua_cert, args.opcua_key, args.opcua_trust, args.opcua_users)
    check_installed()
    if options.secure:
        load_identity(options)  # checked now, not after the engines loaded
    if options.trust is not None:
        load_trust(options.trust)
    if options.users is not None:
        load_users(options.users)
    return options


def _add_security_flags(p: argparse.ArgumentParser) -> None:
    """TLS, tokens, allowlists, /metrics binding (docs/security.md)."""
    g = p.add_argument_group("security (docs/security.md)")
    g.add_argument("--tls-cert", metavar="FILE", help="serve gRPC over TLS with this PEM certificate (chain); "
                   "reloaded on SIGHUP")
    g.add_argument("--tls-key", metavar="FILE", help="the certificate's PEM private key")
    g.add_argument("--tls-client-ca", metavar="FILE",
                   help="mutual TLS: clients must present a certificate signed by this PEM CA")
    g.add_argument("--auth-token-file", metavar="FILE",
                   help="bearer tokens, one 'TOKEN ROLE' per line (roles: viewer, operator; '#' comments); "
                   "calls without a valid token are refused (health stays open); reloaded on SIGHUP")
    g.add_argument("--reflection", action=argparse.BooleanOptionalAction, default=True,
                   help="offer gRPC server reflection (needs a viewer token when tokens are on; default: on)")
    g.add_argument("--allow-hosts", metavar="LIST",
                   help="where cameras may be: comma-separated networks and host names (10.1.0.0/16,10.2.3.4,"
                   "cam1.plant,*.line1.plant); default: any host but link-local and cloud metadata addresses")
    g.add_argument("--allow-synthetic", action="store_true",
                   help="accept synthetic:// demo cameras (on with --demo; each costs up to ~250 MB)")
    g.add_argument("--metrics-host", metavar="ADDR", help="address /metrics listens on (default: --host)")
    g.add_argument("--health-port", type=int, metavar="PORT",
                   help="also answer grpc.health.v1 alone, plaintext and without a token, on this port: for probes "
                   "that cannot speak TLS (Kubernetes' gRPC probes); default: health only on --port")
    g.add_argument("--metrics-tls", action="store_true",
                   help="serve /metrics over HTTPS with --tls-cert/--tls-key (with --tls-client-ca, scrapers "
                   "must present a client certificate)")


def _security_config(args: argparse.Namespace) -> SecurityConfig:
    tls = TlsFiles.from_flags(args.tls_cert, args.tls_key, args.tls_client_ca)
    return SecurityConfig(tls=tls, token_file=args.auth_token_file, reflection=args.reflection,
                          metrics_tls=args.metrics_tls)


def _onnx_gpu_usable(engines: list[str]) -> bool:
    """False when every engine is an `.onnx` file and ONNX Runtime here has no GPU provider (the `onnxruntime`
    package, not `onnxruntime-gpu`): such engines can run on the CPU only. True for any other engine."""
    if not all(Path(e).suffix.lower() == ".onnx" for e in engines):
        return True
    try:
        import onnxruntime as ort
    except ImportError:
        return True  # loading the engine reports the missing package
    return bool({"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()))


def parse_config(args: argparse.Namespace) -> tuple[ServerConfig, list[StreamSpec]]:
    """Resolve engines, devices and initial streams; ConfigError on anything wrong."""
    from .demo import demo_model
    from .devices import parse_gpus

    for name, value in vars(args).items():  # NaN passes every '< 0' check below; inf broke the SLO's buckets
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    engines = [e.strip() for e in (args.engines or "").split(",") if e.strip()]
    if not engines:
        if not args.demo:
            raise ConfigError("no engine given: pass --engines MODEL.onnx (or --demo for the bundled model)")
        engines = [demo_model()]
    devices = parse_gpus(args.gpus)
    if not (args.gpus or "").strip() and devices != ["cpu"] and not _onnx_gpu_usable(engines):
        logging.getLogger(__name__).info("no --gpus: the .onnx engines run on the CPU (this ONNX Runtime has no "
                                         "CUDA provider: pip install onnxruntime-gpu, then --gpus 0-3)")
        devices = ["cpu"]
    if len(engines) > 1 and len(engines) != len(devices):
        raise ConfigError(f"--engines lists {len(engines)} files for {len(devices)} devices ({','.join(devices)}): "
                          "give one file for all or one per device")
    if args.stall_s <= 0 or args.backoff_cap_s <= 0:
        raise ConfigError("--stall-s and --backoff-cap-s must be positive")
    if args.duration is not None and args.duration <= 0:
        raise ConfigError(f"--duration must be positive (leave it out to run until stopped), got {args.duration:g}")
    if args.max_message_mb < 0.1:
        raise ConfigError(f"--max-message-mb must be at least 0.1 (a 1080p JPEG frame is about 0.3), got "
                          f"{args.max_message_mb:g}")
    if args.rebalance_s < 0:
        raise ConfigError(f"--rebalance-s must be 0 (never) or more, got {args.rebalance_s:g}")
    if not args.blind_after_s >= 0:
        raise ConfigError(f"--blind-after-s must be 0 (never) or more, got {args.blind_after_s}")
    if args.evidence_max_mb is not None and args.evidence_dir is None:
        raise ConfigError("--evidence-max-mb caps the --evidence-dir folder: give --evidence-dir too (without it no "
                          "evidence is written)")
    evidence_max_mb = EVIDENCE_MAX_MB if args.evidence_max_mb is None else args.evidence_max_mb
    if not evidence_max_mb > 0:
        raise ConfigError(f"--evidence-max-mb must be positive, got {evidence_max_mb}")
    if not 0 <= args.track_min_score <= 1:
        raise ConfigError(f"--track-min-score must be 0..1, got {args.track_min_score}")
    shard = ShardSpec.resolve(args.shard_index, args.shard_count)
    mqtt = _mqtt_options(args, shard)
    opcua = _opcua_options(args)
    if args.no_state and args.state_dir:
        raise ConfigError("--state-dir and --no-state contradict each other: give one")
    from .state import default_state_dir

    state_dir = None if args.no_state else str(args.state_dir or default_state_dir())
    config = ServerConfig(
        engines=engines, devices=devices, host=args.host, port=args.port, metrics_port=args.metrics_port,
        slo_ms=args.slo_ms, instances=args.instances, threads=args.threads, max_batch=args.max_batch,
        max_streams=args.max_streams, process_late=args.process_late, track_min_score=args.track_min_score,
        evidence_dir=args.evidence_dir, evidence_max_mb=evidence_max_mb, mqtt=mqtt,
        opcua=opcua,
        allow_files=args.allow_files,
        allow_synthetic=args.allow_synthetic or args.demo, metrics_host=args.metrics_host,
        health_port=args.health_port,
        allow_hosts=tuple(h.strip() for h in (args.allow_hosts or "").split(",") if h.strip()),
        security=_security_config(args),
        max_message_bytes=int(args.max_message_mb * 1024 * 1024), subscriber_queue=args.subscriber_queue,
        batch_subscriber_queue=args.batch_subscriber_queue, watch_batch_ms=args.watch_batch_ms,
        background_batch=args.background_batch,
        background_nice=args.background_nice, run_deadline_floor_s=args.run_deadline_s,
        run_deadline_factor=args.run_deadline_factor, recheck_s=args.recheck_s, state_dir=state_dir,
        max_pending_images=args.max_pending_images, max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_calls_per_client=args.max_calls_per_client,
        rebalance_s=args.rebalance_s, worker_processes=args.worker_processes,
        rtsp=RtspOptions(stall_s=args.stall_s, backoff_cap_s=args.backoff_cap_s,
                         backoff_base_s=min(0.5, args.backoff_cap_s), decode=args.decode,
                         blind_after_s=args.blind_after_s),
        shard=shard)
    return config, listed_streams(args, config)


def listed_streams(args: argparse.Namespace, config: ServerConfig, quiet: bool = False) -> list[StreamSpec]:
    """The cameras of the command line (--streams, --source; --demo's without them), this replica's share, each
    checked; ConfigError with one line. Read at start, and again on SIGHUP (camera_list.py)."""
    from .demo import demo_streams
    from .sources.synthetic import parse_synthetic_url

    streams: list[StreamSpec] = []
    if args.streams:
        streams += load_streams_file(args.streams)
    # ${VAR} in the operator's own URLs comes from the environment (never in URLs sent over gRPC: urls.py)
    streams += [StreamSpec(f"cam{i}", expand_credentials(url, f"--source cam{i}")) for i, url in enumerate(args.source)]
    if args.demo and not args.streams and not args.source:  # a list emptied (and read again at SIGHUP) stays empty
        streams = demo_streams()
    ids = [s.stream_id for s in streams]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"stream ids used twice: {dup} (--source gets cam0, cam1, ...; rename those in --streams)")
    if config.shard.count > 1:  # every replica reads the same camera list and keeps its own share
        mine = [s for s in streams if config.shard.owns(s.stream_id)]
        if not quiet:
            logging.getLogger(__name__).info("%s: serving %d of the %d cameras listed", config.shard, len(mine),
                                             len(streams))
        streams = mine
    if len(streams) > config.max_streams:
        raise ConfigError(f"{len(streams)} cameras listed but --max-streams is {config.max_streams}")
    for spec in streams:  # a mistyped URL is one line now, not after the engines have loaded
        try:
            kind = url_kind(spec.url, config.allow_files)
            config.camera_policy.check(spec.url, kind)
            if kind == "synthetic":
                parse_synthetic_url(spec.url)
            path = spec.url.removeprefix("file://")
            if kind == "file" and not Path(path).is_file():  # it used to start, then log the camera failed
                raise InvalidArgumentError(f"no such video file: {path}")
        except (InvalidArgumentError, PermissionDeniedError) as e:
            raise ConfigError(f"stream {spec.stream_id}: {redact_text(str(e))}") from None
    return streams


def main(argv: list[str] | None = None) -> int:
    """Entry point of `yolov12-serve`; returns the exit status."""
    from engines.base import EngineError

    from .app import LoadingInterruptedError, RunOptions, run_server

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_redaction()  # no camera password in any log line, whoever writes it
    try:
        config, streams = parse_config(args)
        if args.check:
            from .configcheck import check_config

            lines = check_config(config, streams)
            print("yolov12-serve: the configuration is good (engines read, not loaded: a start checks that the "
                  "devices take them)\n  " + "\n  ".join(lines))
            return 0
        # a table a second (a line per camera) in a journal or a container's log is noise: --demo's only on a terminal
        show = (args.demo and sys.stdout.isatty()) if args.status is None else args.status
        every = 1.0 if sys.stdout.isatty() else STATUS_TO_A_LOG_S  # a table a second is for a person watching
        options = RunOptions(streams, duration=args.duration, status_interval=every if show else None,
                             summary=bool(args.duration) or args.demo,
                             reread_streams=lambda: listed_streams(args, config, quiet=True))
        return asyncio.run(run_server(config, options))
    except (ServerError, EngineError) as e:
        print(f"yolov12-serve: error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # a port in use, mostly
        print(f"yolov12-serve: error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    except LoadingInterruptedError:  # the loading thread is native code that cannot be stopped: leave without it
        print("yolov12-serve: stopped while the engines were loading", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
