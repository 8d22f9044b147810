"""The server's life: start gRPC (NOT_SERVING), load engines, serve metrics, add the initial streams, SERVING;
then wait for SIGTERM / SIGINT / --duration and drain (NOT_SERVING, stop sources, finish frames in flight,
end watchers, stop gRPC) well inside 10 seconds. Under systemd each step is told to it (systemd.py): READY once
SERVING, RELOADING and READY around a SIGHUP, STOPPING at the drain, and watchdog pings while the event loop and
the core's supervision thread turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from . import priority
from .api import GrpcServer, create_server
from .camera_list import apply_camera_list
from .config import ServerConfig, StreamSpec
from .core import EngineLoader, ServerCore
from .errors import ServerError
from .frames import now
from .opcua import OpcUaServer
from .ports import bare_host, check_bindable, host_port
from .security import Security
from .sources import StreamState
from .sources.rtsp import end_camera_threads
from .status import StatusPrinter, render_summary, render_table
from .systemd import Notifier

__all__ = ["DRAIN_S", "LoadingInterruptedError", "RunOptions", "ensure_descriptors", "run_server"]

log = logging.getLogger(__name__)

DRAIN_S = 3.0  # frames in flight get this long to finish; gRPC calls get GRPC_GRACE_S more
GRPC_GRACE_S = 2.0
LOADING_NOTE_S = 30.0  # while the engines load (a TensorRT engine, a wedged GPU), a line this often
STATUS_CHECK_S = 5.0  # under systemd, the Status: line of `systemctl status` is brought up to date this often
SUPERVISION_STALL_MIN_S = 5.0  # watchdog pings stop once the core's supervision thread has not turned this long


class LoadingInterruptedError(Exception):
    """SIGTERM / SIGINT came while the engines loaded: gRPC is stopped, the loading thread cannot be interrupted
    (an engine opening or warming up is native code), so the caller exits the process without waiting for it."""


@dataclass
class RunOptions:
    """How long to run and what to print, beside the server configuration."""

    streams: list[StreamSpec]
    duration: float | None = None  # seconds; None: until SIGTERM / SIGINT
    status_interval: float | None = None  # seconds between status tables; None: no table
    summary: bool = False  # print whole-run figures per stream at exit
    out: TextIO | None = None
    # the command line's cameras read again (--streams, --source): SIGHUP applies them (camera_list.py); ConfigError
    # when the file is bad. None: the list given at start stays.
    reread_streams: Callable[[], list[StreamSpec]] | None = None


# Open files the server may need: its own (engines, logs, pipes to device processes, epoll) plus per camera (an RTSP
# connection over UDP holds RTSP, RTP and RTCP sockets) and per gRPC call (a watcher or Detect call on a connection of
# its own).
BASE_DESCRIPTORS = 64
DESCRIPTORS_PER_CAMERA = 4


def ensure_descriptors(config: ServerConfig) -> int:
    """Raise the soft open-files limit towards what --max-streams and --max-concurrent-rpcs need (as far as the hard
    limit allows) and warn when it stays short; returns the soft limit now. Past it, a camera's connection fails with
    'Too many open files' (retried) and new gRPC connections wait unanswered."""
    need = BASE_DESCRIPTORS + DESCRIPTORS_PER_CAMERA * config.max_streams + config.max_concurrent_rpcs
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(hard, need)
        if raised > soft:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
                soft = raised
        if soft < need:
            log.warning("open files are limited to %d (ulimit -n, systemd LimitNOFILE, docker --ulimit nofile) but "
                        "--max-streams %d and --max-concurrent-rpcs %d may need about %d: past the limit cameras "
                        "fail to connect ('Too many open files', retried) and new gRPC calls wait; raise the limit "
                        "or lower those options", soft, config.max_streams, config.max_concurrent_rpcs, need)
    return soft


async def run_server(config: ServerConfig, options: RunOptions, load_engine: EngineLoader | None = None) -> int:
    """Run until stopped; returns the exit status (0 after a clean drain). ConfigError/EngineError on bad set-up."""
    out = options.out or sys.stdout
    notifier = Notifier.from_environment()  # taken out of the environment before any device process is started
    try:
        return await _run(config, options, load_engine, out, notifier)
    finally:
        notifier.close()


async def _run(config: ServerConfig, options: RunOptions, load_engine: EngineLoader | None, out: TextIO,
               notifier: Notifier) -> int:
    ensure_descriptors(config)
    loop = asyncio.get_running_loop()
    core = ServerCore(config, load_engine)
    security = Security(config.security)  # certificates and tokens checked before anything else starts
    host = bare_host(config.host)  # '::' and '[::]' alike: gRPC wants it bracketed, sockets and HTTP bare
    grpc_server, port = await create_server(core, host_port(host, config.port), config.max_message_bytes, security)
    try:
        health_port = None if config.health_port is None else await grpc_server.serve_health_on(host,
                                                                                                 config.health_port)
        if config.metrics_port > 0:  # said now, not after the engines took their time to load
            check_bindable(host_port(bare_host(config.metrics_host or host), config.metrics_port), "metrics",
                           "--metrics-port", "0: any free port, -1: off")
        opcua = _opcua_server(core, config) if config.opcua is not None else None
        for what, action in opcua.reloads() if opcua is not None else ():  # SIGHUP: its certificate, trust, users
            security.on_reload(what, action)
    except OSError:  # the main port is open already: closed before the one line is printed
        await grpc_server.stop(0)
        raise
    core.on_health_change = lambda serving: loop.call_soon_threadsafe(_flip_health, grpc_server, serving)
    core.on_device_health = lambda device, ok: loop.call_soon_threadsafe(_flip_device, grpc_server, device, ok)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    announced = ""  # the gRPC address once systemd was told READY (reloads are told to it from then on)
    reloads = 0  # SIGHUPs whose reload has not finished: READY again once none is left
    sighups = asyncio.Lock()  # one after the other: two quick SIGHUPs would apply the camera list twice at once

    def on_sighup() -> None:  # certificates and tokens read again, then the engine files, then the camera list
        nonlocal reloads
        told = bool(announced) and not stop.is_set()
        if told:
            reloads += 1
            notifier.reloading("reloading certificates, tokens, engine files and the camera list (SIGHUP)")
        security.reload()
        _keep(asyncio.ensure_future(reload(told)))

    async def reload(told: bool) -> None:
        nonlocal reloads
        try:
            await _reload_on_sighup(core, options.reread_streams, sighups)
        finally:
            if told:
                reloads -= 1
                if reloads == 0 and not stop.is_set():
                    notifier.ready(_status_line(core, announced))

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    started = now()
    pings = asyncio.ensure_future(_watchdog_pings(notifier, core)) if notifier.watchdog_s else None
    try:
        log.info("loading the engines (%s) on %s", ", ".join(config.engines), ", ".join(config.devices))
        notifier.status(f"loading the engines on {','.join(config.devices)} (gRPC on {host_port(host, port)} says "
                        "NOT_SERVING until they are warm)")
        if not await _start_unless_stopped(core, stop):  # health says SERVING once the streams are back
            log.warning("stopped while the engines were loading")
            await grpc_server.stop(0)
            if opcua is not None:
                opcua.close()
            raise LoadingInterruptedError
        if opcua is not None:  # it was built and bound while the engines loaded
            await loop.run_in_executor(None, opcua.wait_started)
        metrics_host = bare_host(config.metrics_host or host)
        metrics_port = _serve_metrics(core, config, security, metrics_host) if config.metrics_port >= 0 else None
        if core.mqtt is not None:  # its client certificate and password rotate with the server's (SIGHUP)
            security.on_reload("MQTT TLS files", core.mqtt.reload_certificate)
            security.on_reload("MQTT credentials", core.mqtt.reload_credentials)
        # the workers run: all else yields to them (priority.py)
        priority.lower_others(config.background_nice, config.background_batch)
        priority.shorten_lock_turns()
        _freeze_startup_heap()  # before the streams: theirs come and go, and a removed one is collected as usual
        for spec in options.streams:
            core.add_stream(spec, persist=False, listed=True)  # the command line brings them back
        core.restore_streams()
        core.opened()
        https = " over HTTPS" if config.security.metrics_tls else ""
        metrics_at = f"on {host_port(metrics_host, metrics_port)}/metrics{https}" if metrics_port is not None else "off"
        print(f"yolov12-serve {_version()}: gRPC on {host_port(host, port)}, metrics {metrics_at}, devices "
              f"{','.join(core.runtimes)}, SLO {config.slo_ms:g} ms, {security.describe()}"
              f"{'' if health_port is None else f', health also on {host_port(host, health_port)}'}",
              file=out, flush=True)
        security.warn_if_open(host)  # once it serves (a start that fails says only why)
        if opcua is not None and not opcua.options.secure and bare_host(opcua.options.address[0]) not in (
                "127.0.0.1", "::1", "localhost"):
            log.warning("OPC UA on %s without --opcua-cert: unencrypted; anyone who reaches the port reads every "
                        "camera's state, rates and object counts (read-only; docs/security.md)", opcua.endpoint)
        started = now()
        status = asyncio.create_task(_show_status(core, options, out, port)) if options.status_interval else None
        if notifier.enabled and not stop.is_set():
            await _health_settled()  # health says SERVING on the port before systemd hears READY
            announced = host_port(host, port)
            notifier.ready(_status_line(core, announced))
            _keep(asyncio.ensure_future(_keep_status(notifier, core, announced, stop)))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), options.duration)
        if status is not None:
            status.cancel()
    except LoadingInterruptedError:
        notifier.stopping("stopped while the engines were loading")
        raise
    except BaseException:
        stop.set()
        notifier.stopping("stopping after an error")
        await _shutdown(core, grpc_server, opcua)
        raise
    finally:
        if pings is not None:
            pings.cancel()
    stop.set()  # (--duration) no READY after a reload still running
    elapsed = now() - started
    log.info("draining")
    notifier.stopping(f"draining: {_cameras(len(core.streams()))}")
    t0 = now()
    await _shutdown(core, grpc_server, opcua)
    log.info("drained in %.2f s", now() - t0)
    if options.summary:
        print(render_summary(core.streams(), config.slo_ms, elapsed), file=out, flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(sig)
    return 0


async def _start_unless_stopped(core: ServerCore, stop: asyncio.Event) -> bool:
    """`core.start` (engines loaded and warmed up) in a thread of its own; True when done, False as soon as `stop`
    is set first. A daemon thread, not the loop's executor: asyncio.run would wait for an executor's threads at
    exit, and a hung warm-up would then hold SIGTERM off for ever."""
    loop = asyncio.get_running_loop()
    started: asyncio.Future[None] = loop.create_future()

    def run() -> None:
        try:
            core.start(True)
        except BaseException as e:  # handed to the loop, raised there
            loop.call_soon_threadsafe(_settle, started, e)
        else:
            loop.call_soon_threadsafe(_settle, started, None)

    threading.Thread(target=run, name="engine-load", daemon=True).start()
    stopping = asyncio.ensure_future(stop.wait())
    t0 = now()
    try:
        while True:
            await asyncio.wait({started, stopping}, timeout=LOADING_NOTE_S, return_when=asyncio.FIRST_COMPLETED)
            if started.done():
                started.result()
                return True
            if stopping.done():
                return False
            log.warning("the engines are still loading after %.0f s (SIGTERM or Ctrl-C stops the server)", now() - t0)
    finally:
        stopping.cancel()


async def _health_settled() -> None:
    """Let the health flips the core asked for (call_soon_threadsafe from `_update_serving`) reach the gRPC health
    service: one loop turn runs the scheduled callbacks, which start the tasks awaited here. Only those: a SIGHUP's
    reload that came during the start (an engine loaded again, minutes on TensorRT) runs on after READY."""
    await asyncio.sleep(0)
    if _flips:
        await asyncio.gather(*list(_flips), return_exceptions=True)


def _cameras(n: int) -> str:
    return f"{n} camera{'' if n == 1 else 's'}"


def _status_line(core: ServerCore, address: str) -> str:
    """The Status: line of `systemctl status`, e.g. 'serving 5 cameras (4 streaming) on 2 devices (cpu:0,cpu:1);
    gRPC on 0.0.0.0:50051'."""
    streams = core.streams()
    streaming = sum(s.state == StreamState.STREAMING for s in streams)
    devices = list(core.runtimes.items())
    down = [name for name, rt in devices if not rt.health.healthy]
    line = (f"serving {_cameras(len(streams))} ({streaming} streaming) on {len(devices)} "
            f"device{'' if len(devices) == 1 else 's'} ({','.join(name for name, _ in devices)})")
    if down:
        line += f", out of service: {','.join(down)}"
    return f"{line}; gRPC on {address}"


async def _keep_status(notifier: Notifier, core: ServerCore, address: str, stop: asyncio.Event) -> None:
    """Bring systemd's Status: line up to date when cameras or devices change (checked every STATUS_CHECK_S)."""
    last = _status_line(core, address)
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), STATUS_CHECK_S)
        if stop.is_set():
            return
        line = _status_line(core, address)
        if line != last:
            notifier.status(line)
            last = line


async def _watchdog_pings(notifier: Notifier, core: ServerCore) -> None:
    """WATCHDOG=1 every half watchdog period, sent from the event loop: a loop that hangs (a call that blocks it,
    a deadlock under the GIL) stops the pings and systemd restarts the server. They stop too while the core's
    supervision thread (stall detection, device re-checks, device-process restarts: core._watch) has not turned for
    max(half the period, SUPERVISION_STALL_MIN_S): a core deadlocked on its lock serves nothing, though the loop runs.
    Devices out of service do not stop them: the server moves their cameras, re-checks them every --recheck-s and
    starts device processes again itself, and says so on health, metrics and alerts; a restart would drop the
    devices that still serve."""
    assert notifier.watchdog_s is not None
    period = notifier.watchdog_s / 2
    limit = max(period, SUPERVISION_STALL_MIN_S)
    held = False
    while True:
        stalled = core.ready and not core.draining and now() - core.supervision_turned_at > limit
        if not stalled:
            notifier.watchdog()
            if held:
                log.warning("the core's supervision thread turns again: watchdog pings resumed")
        elif not held:
            log.error("the core's supervision thread has not turned for %.0f s: watchdog pings to systemd stop (it "
                      "restarts the server after WatchdogSec)", now() - core.supervision_turned_at)
        held = stalled
        await asyncio.sleep(period)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if not future.done():
        future.set_result(None) if error is None else future.set_exception(error)


async def _reload_on_sighup(core: ServerCore, reread_streams: Callable[[], list[StreamSpec]] | None,
                            one_at_a_time: asyncio.Lock) -> None:
    """SIGHUP: reload the engine files (ReloadEngines without arguments) when one was replaced or rewritten since it
    was loaded, then apply the command line's camera list read again (after the engines: a class the new model
    brings may be named in it); a refusal of either is logged, nothing else. Unchanged engine files are kept: a
    certificate rotation's SIGHUP (every few weeks, from cert-manager) need not load every engine again. A SIGHUP
    while the server starts does both once it has started: its engines and cameras are not yet there to change."""
    loop = asyncio.get_running_loop()
    async with one_at_a_time:
        while core.starting and not core.draining:  # the start loads the files and adds the list it read first
            await asyncio.sleep(0.2)
        if core.draining:
            return
        if not core.engine_files_changed():
            log.info("SIGHUP: the engine files are unchanged since they were loaded: kept (yolov12-ctl reload "
                     "loads them again all the same)")
        else:
            log.info("SIGHUP: reloading the engine files")
            try:
                await loop.run_in_executor(None, core.reload_engines, None)
            except ServerError as e:
                log.error("SIGHUP: engine reload refused: %s", e)
        if reread_streams is not None and not core.draining:
            await loop.run_in_executor(None, _apply_listed_cameras, core, reread_streams)


def _apply_listed_cameras(core: ServerCore, reread_streams: Callable[[], list[StreamSpec]]) -> None:
    """The camera list read again and applied (camera_list.py), in one log line; a list that cannot be read or
    checked is one error line and changes nothing."""
    try:
        wanted = reread_streams()
    except ServerError as e:  # ConfigError mostly: one line naming the file, the entry and what is wrong
        log.error("SIGHUP: the camera list was not applied (the running cameras are kept): %s", e)
        return
    change = apply_camera_list(core, wanted)
    log.info("SIGHUP: camera list applied: %s", change.describe())


def _opcua_server(core: ServerCore, config: ServerConfig) -> OpcUaServer:
    """--opcua: its port checked (OSError with the fix when taken), then built and bound in a thread of its own
    while the engines load (opcua.py says why not on this loop)."""
    options = config.opcua
    assert options is not None
    opc_host, opc_port = options.address
    check_bindable(host_port(opc_host, opc_port), "OPC UA", "--opcua", "opc.tcp://HOST:PORT")

    def on_sessions(n: int) -> None:
        if core.metrics is not None:
            core.metrics.opcua_sessions.labels(options.url).set(n)

    def subscribe(loop: asyncio.AbstractEventLoop):
        return core.fanout.subscribe(None, config.batch_subscriber_queue, loop, label=f"opcua {options.url}")

    server = OpcUaServer(options, streams=core.streams, status=core.status_word,
                         names=lambda r: core.class_names(r.model_version, r.device),
                         class_names=core.counted_classes, subscribe=subscribe, on_sessions=on_sessions)
    server.start()
    return server


def _serve_metrics(core: ServerCore, config: ServerConfig, security: Security, host: str) -> int:
    """Start /metrics on `host` (HTTPS with the gRPC certificate under --metrics-tls, reloaded with it)."""
    tls = config.security.tls if config.security.metrics_tls else None
    if tls is None:
        return core.metrics.serve(config.metrics_port, host)
    port = core.metrics.serve(config.metrics_port, host, certfile=tls.cert, keyfile=tls.key,
                              client_cafile=tls.client_ca)
    security.on_reload("metrics certificate", lambda: core.metrics.reload_certificate(tls.cert, tls.key, tls.client_ca))
    return port


def _freeze_startup_heap() -> None:
    """Keep the objects made at start-up (modules, engines, gRPC) out of every later garbage collection.

    A full collection walks every tracked object while holding the GIL: ~36k objects after start-up took
    30-40 ms on a 2-core VM, a stall of nearly the whole 45 ms SLO for every frame in flight, once every
    ~45 s at half load. Frozen, a full collection walks only what was made since (under 1 ms). What is frozen
    is never collected: the engines live as long as the process; a hot engine swap must free the old one's
    sessions in its close(), not count on the collector."""
    gc.collect()
    gc.freeze()
    log.debug("garbage collector: %d start-up objects frozen", gc.get_freeze_count())


_pending: set[asyncio.Task] = set()
_flips: set[asyncio.Task] = set()  # the health flips among them (READY waits for these)


def _flip_health(server: GrpcServer, serving: bool) -> None:
    _keep(asyncio.ensure_future(server.set_serving(serving)), _flips)


def _flip_device(server: GrpcServer, device: str, serving: bool) -> None:
    _keep(asyncio.ensure_future(server.set_device_serving(device, serving)), _flips)


def _keep(task: asyncio.Future, *also: set[asyncio.Task]) -> None:
    for kept in (_pending, *also):
        kept.add(task)  # keep a reference until it ran (the loop holds only weak ones)
        task.add_done_callback(kept.discard)


async def _shutdown(core: ServerCore, grpc_server: GrpcServer, opcua: OpcUaServer | None = None) -> None:
    await grpc_server.set_serving(False)
    await asyncio.get_running_loop().run_in_executor(None, core.drain, DRAIN_S)
    if opcua is not None:  # its clients saw Status "draining" meanwhile
        await asyncio.get_running_loop().run_in_executor(None, opcua.close)
    await grpc_server.stop(GRPC_GRACE_S)
    left = await asyncio.get_running_loop().run_in_executor(None, end_camera_threads)
    if left:
        log.warning("%d camera threads still inside FFmpeg at exit", left)


async def _show_status(core: ServerCore, options: RunOptions, out: TextIO, port: int) -> None:
    printer = StatusPrinter(out)
    host = bare_host(core.config.host)
    host = host if host not in ("0.0.0.0", "::", "") else "localhost"
    hint = (f"from another shell: {_ctl_command()} --server {host_port(host, port)} streams (or watch, info, add ID "
            "URL, --help)")
    wait = min(1.0, options.status_interval)  # the first table soon, then every status_interval
    while True:
        await asyncio.sleep(wait)
        wait = options.status_interval
        title = f"yolov12-serve on {','.join(core.runtimes)}, gRPC :{port} - "
        printer.show(render_table(core.list_streams(), core.config.slo_ms, title) + "\n" + hint)


def _ctl_command() -> str:
    """How to run yolov12-ctl from here: by name when it is on PATH, else where this Python installed it (a
    newcomer running scripts/demo has .venv/bin, not on PATH)."""
    installed = Path(sys.executable).parent / "yolov12-ctl"
    on_path = shutil.which("yolov12-ctl")
    if on_path and Path(on_path).resolve() == installed.resolve():
        return "yolov12-ctl"
    if installed.is_file():
        relative = os.path.relpath(installed)
        return relative if not relative.startswith("..") else str(installed)
    return f"{Path(sys.executable).name} -m yolov12_serve.ctl"


def _version() -> str:
    from . import __version__

    return __version__
