"""The server under systemd: the notify protocol (yolov12_serve/systemd.py) spoken by the real server process to a
real unix datagram socket bound here, as systemd binds it (SO_PASSCRED: each datagram's sender pid, as systemd
checks it for NotifyAccess=main), and the unit file in deploy/systemd/ checked by `systemd-analyze verify`."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_server_harness import ROOT, ServerProcess, model_path, wait_until

from yolov12_serve import app
from yolov12_serve.systemd import Notifier, monotonic_usec

UNIT = ROOT / "deploy" / "systemd" / "yolov12-serve.service"


@dataclass
class Datagram:
    at: float  # time.monotonic() when received
    pid: int  # the sender's, from SCM_CREDENTIALS
    fields: dict[str, str] = field(default_factory=dict)


class NotifySocket:
    """A unix datagram socket standing in for systemd's notify socket; every datagram kept with its sender's pid.
    `on_datagram` runs in the reading thread as each arrives (a check that must happen at once)."""

    def __init__(self, abstract: bool = False, on_datagram: Callable[[Datagram], None] | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.folder = tempfile.mkdtemp(prefix="sdn-")  # short: a unix socket path has at most 107 bytes
        if abstract:
            name = f"yolov12-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = os.path.join(self.folder, "notify")
            self.sock.bind(self.address)
        self.sock.settimeout(0.2)
        self.received: list[Datagram] = []
        self.errors: list[BaseException] = []
        self.on_datagram = on_datagram
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:12])[0]
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            gram = Datagram(time.monotonic(), pid, fields)
            if self.on_datagram is not None:
                try:
                    self.on_datagram(gram)
                except BaseException as e:  # raised in the test's thread by `check`
                    self.errors.append(e)
            self.received.append(gram)

    def with_field(self, key: str, value: str = "1") -> list[Datagram]:
        return [d for d in self.received if d.fields.get(key) == value]

    def wait_for(self, key: str, value: str = "1", count: int = 1, timeout: float = 60) -> list[Datagram]:
        return wait_until(lambda: len(got := self.with_field(key, value)) >= count and got, timeout, 0.02,
                          f"{count} x {key}={value} (got {[d.fields for d in self.received][-8:]})")

    def check(self) -> None:
        if self.errors:
            raise self.errors[0]

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2)
        self.sock.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def notified_server(*args: str, env: dict[str, str] | None = None, abstract: bool = False,
                    on_datagram: Callable[[Datagram], None] | None = None, model: Path | None = None,
                    faults: Path | None = None, wait: bool = True):
    sock = NotifySocket(abstract, on_datagram)
    srv = None
    try:
        srv = ServerProcess(*args, model=model, faults=faults, wait=wait,
                            env={"NOTIFY_SOCKET": sock.address, **(env or {})})
        yield srv, sock
    finally:
        if srv is not None:
            srv.close()
        sock.close()


def descendants(pid: int) -> list[int]:
    """The processes `pid` started, and theirs (from /proc: each process's parent)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _port_of(status: str) -> int:
    m = re.search(r"gRPC on [\d.]+:(\d+)", status)
    assert m, status
    return int(m.group(1))


# ------------------------------------------------------------------------------------------- the server process
def test_ready_only_once_the_port_serves_then_stopping_on_sigterm():
    """READY=1 (with MAINPID and a Status: line naming the cameras, devices and port) comes once, from the server's
    own pid, and only when health on the gRPC port already says SERVING (checked the moment READY arrives); the
    abstract-namespace address works; SIGTERM sends STOPPING=1 with a draining status and the server exits 0."""
    seen_health: list[int] = []

    def on_datagram(d: Datagram) -> None:
        if d.fields.get("READY") == "1":
            seen_health.append(health(_port_of(d.fields["STATUS"])))

    with notified_server("--allow-synthetic", "--source", "synthetic://a?fps=5&size=320x192", abstract=True,
                         on_datagram=on_datagram) as (srv, sock):
        ready = sock.wait_for("READY")[0]
        sock.check()
        assert seen_health == [health_pb2.HealthCheckResponse.SERVING]
        assert ready.pid == srv.proc.pid and ready.fields["MAINPID"] == str(srv.proc.pid)
        assert ready.fields["STATUS"].startswith("serving 1 camera (") and "on 1 device (cpu)" in ready.fields[
            "STATUS"] and _port_of(ready.fields["STATUS"]) == srv.port, ready.fields
        loading = sock.received[0]  # before it only the Status: line while the engines load (no watchdog asked for)
        assert loading.fields["STATUS"].startswith("loading the engines on cpu") and sock.received[1:2] == [ready]
        rc, _ = srv.terminate()
        assert rc == 0
        stopping = sock.wait_for("STOPPING", timeout=5)[0]
        assert stopping.fields["STATUS"].startswith("draining"), stopping.fields
        assert len(sock.with_field("READY")) == 1 and {d.pid for d in sock.received} == {srv.proc.pid}


def _reload_watch(tmp_path: Path) -> tuple[Path, list[bool], list[ServerProcess], Callable[[Datagram], None]]:
    """An engine file of the test's own (to rewrite), and a datagram callback that notes at each READY=1 whether
    an engine reload had been logged ('now serving') by then, once the server is put in the returned list."""
    served = tmp_path / "model.onnx"
    shutil.copy(model_path(), served)
    reloaded_at_ready: list[bool] = []
    srv_box: list[ServerProcess] = []

    def on_datagram(d: Datagram) -> None:
        if d.fields.get("READY") == "1" and srv_box:
            reloaded_at_ready.append("now serving" in srv_box[0].log())

    return served, reloaded_at_ready, srv_box, on_datagram


def test_sighup_reloading_then_ready_once_the_engines_are_reloaded(tmp_path):
    """SIGHUP: RELOADING=1 with MONOTONIC_USEC (CLOCK_MONOTONIC, after the signal was sent), then READY=1 only when
    the rewritten engine file serves (its 'now serving' line already logged when READY arrives); a SIGHUP with
    nothing changed is RELOADING then READY too."""
    served, reloaded_at_ready, srv_box, on_datagram = _reload_watch(tmp_path)
    with notified_server(model=served, on_datagram=on_datagram) as (srv, sock):
        sock.wait_for("READY")
        srv_box.append(srv)
        sent = monotonic_usec()
        shutil.copy(model_path(), served)  # rewritten on disk: SIGHUP loads it again
        srv.proc.send_signal(signal.SIGHUP)
        reloading = sock.wait_for("RELOADING")[0]
        assert sent <= int(reloading.fields["MONOTONIC_USEC"]) <= monotonic_usec()
        again = sock.wait_for("READY", count=2)[1]
        sock.check()
        assert again.at >= reloading.at and reloaded_at_ready == [True], srv.log()
        srv.proc.send_signal(signal.SIGHUP)  # unchanged: certificates and tokens only
        sock.wait_for("RELOADING", count=2)
        sock.wait_for("READY", count=3)
        grams = [d.fields for d in sock.received if "READY" in d.fields or "RELOADING" in d.fields]
        assert [("READY" in g, "RELOADING" in g) for g in grams] == [(True, False), (False, True)] * 2 + [
            (True, False)]


def test_ready_when_the_start_is_done_not_after_a_sighup_that_came_during_it(tmp_path):
    """A SIGHUP while the engines load, the engine file replaced meanwhile: its reload runs once the server has
    started, and READY does not wait for it (a second engine load, minutes on TensorRT, would push READY past
    TimeoutStartSec and systemd would kill a server that serves). The reload is slowed by a fault switch."""
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "delay-cpu").write_text("0.2")  # seconds a frame: each warm-up takes several seconds
    served, reloaded_at_ready, srv_box, on_datagram = _reload_watch(tmp_path)
    with notified_server(model=served, faults=faults, wait=False, on_datagram=on_datagram) as (srv, sock):
        srv_box.append(srv)
        wait_until(lambda: "loading the engines" in srv.log(), 60, what="the engines loading")
        time.sleep(0.3)  # the start has taken the file's signature (at once) and is warming it up (seconds)
        shutil.copy(model_path(), served)
        srv.proc.send_signal(signal.SIGHUP)
        sock.wait_for("READY", timeout=90)
        assert reloaded_at_ready == [False], srv.log()[-3000:]
        (faults / "delay-cpu").unlink()  # the reload's own warm-up need not be slow
        wait_until(lambda: "cpu: now serving" in srv.log(), 90, what="the reload after the start")
        assert not sock.with_field("RELOADING"), [d.fields for d in sock.received]  # not told: it was not READY


def test_watchdog_pings_every_half_period():
    """WATCHDOG_USEC=1 s: WATCHDOG=1 about every 0.5 s from the server's pid; WATCHDOG_USEC and NOTIFY_SOCKET are
    not left in the environment of what the server starts."""
    with notified_server(env={"WATCHDOG_USEC": "1000000"}) as (srv, sock):
        sock.wait_for("READY")
        first = len(sock.with_field("WATCHDOG"))
        time.sleep(3.2)
        pings = sock.with_field("WATCHDOG")[first:]
        gaps = [b.at - a.at for a, b in itertools.pairwise(pings)]
        assert 5 <= len(pings) <= 8, gaps
        assert all(0.3 < g < 0.8 for g in gaps), gaps
        assert {d.pid for d in pings} == {srv.proc.pid}


def test_no_watchdog_pings_when_the_watchdog_is_another_process():
    """WATCHDOG_PID names another process (a wrapper script's): the server says READY but sends no pings."""
    with notified_server(env={"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())}) as (_srv, sock):
        sock.wait_for("READY")
        time.sleep(1.5)
        assert not sock.with_field("WATCHDOG"), [d.fields for d in sock.received]


@pytest.mark.slow
def test_device_processes_neither_notify_nor_inherit_the_socket():
    """--gpus cpu:2 (a process per device): READY once, every datagram from the main pid, and the device processes'
    environment holds no NOTIFY_SOCKET / WATCHDOG_USEC (nothing they start could talk to systemd)."""
    with notified_server("--gpus", "cpu:2", "--worker-processes", "on", env={"WATCHDOG_USEC": "2000000"}) \
            as (srv, sock):
        sock.wait_for("READY")
        info = srv.client().server_info()
        pids = [d.pid for d in info.device_status]
        assert len(pids) == 2 and all(pids) and srv.proc.pid not in pids, info
        children = descendants(srv.proc.pid)
        assert set(pids) <= set(children), children
        for child in children:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            assert not [v for v in environ if v.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_"))], cmdline
        time.sleep(1.5)
        assert len(sock.with_field("READY")) == 1 and "on 2 devices (cpu:0,cpu:1)" in sock.with_field(
            "READY")[0].fields["STATUS"]
        assert {d.pid for d in sock.received} == {srv.proc.pid}


# ------------------------------------------------------------------------------------------- in this process
def test_notifier_without_socket_or_with_a_gone_one_never_fails(tmp_path, caplog):
    """No NOTIFY_SOCKET: nothing is sent; a socket path that is gone: False, logged once; the variables are taken
    out of the environment it was read from."""
    environ = {"PATH": "/bin"}
    quiet = Notifier.from_environment(environ)
    assert not quiet.enabled and not quiet.ready("x") and quiet.watchdog_s is None
    environ = {"NOTIFY_SOCKET": str(tmp_path / "gone"), "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    gone = Notifier.from_environment(environ)
    assert environ == {} and gone.watchdog_s == 30.0
    with caplog.at_level(logging.WARNING, "yolov12_serve.systemd"):
        assert not gone.ready("serving") and not gone.watchdog() and not gone.stopping()
    assert len([r for r in caplog.records if "notify socket" in r.getMessage()]) == 1
    gone.close()


def test_watchdog_pings_stop_while_the_core_is_wedged(monkeypatch):
    """A real core (the demo engine, loaded here) whose lock another thread holds: its supervision thread cannot
    turn, and the event loop's pings stop after the limit though the loop runs; they resume when it is let go."""
    from yolov12_serve.config import ServerConfig
    from yolov12_serve.core import ServerCore

    monkeypatch.setattr(app, "SUPERVISION_STALL_MIN_S", 0.6)
    core = ServerCore(ServerConfig(engines=[str(model_path())], devices=["cpu"], instances=1, state_dir=None))
    core.start()
    sock = NotifySocket()
    notifier = Notifier(sock.address, watchdog_usec=200_000)  # a ping every 0.1 s, stalled after 0.6 s
    release = threading.Event()

    def wedge() -> None:
        with core._lock:
            release.wait(10)

    async def run() -> tuple[int, int, int]:
        pings = asyncio.ensure_future(app._watchdog_pings(notifier, core))
        await asyncio.sleep(0.6)
        before = len(sock.with_field("WATCHDOG"))
        threading.Thread(target=wedge, daemon=True).start()
        await asyncio.sleep(1.2)  # 0.6 s to notice, then 0.6 s without pings
        mid = len(sock.with_field("WATCHDOG"))
        await asyncio.sleep(0.6)
        during = len(sock.with_field("WATCHDOG")) - mid
        release.set()
        await asyncio.sleep(0.8)
        after = len(sock.with_field("WATCHDOG")) - mid - during
        pings.cancel()
        return before, during, after

    try:
        before, during, after = asyncio.run(run())
    finally:
        release.set()
        core.drain(1)
        notifier.close()
        sock.close()
    assert before >= 4 and during == 0 and after >= 4, (before, during, after)


# ------------------------------------------------------------------------------------------- the unit file
def _verify(unit: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})


def _unit_with_this_venv(folder: Path, text: str | None = None) -> Path:
    """The shipped unit with its ExecStart's /opt/yolov12-serve/.venv made this checkout's venv (verify checks the
    program is there and executable); everything else as shipped."""
    venv = Path(sys.executable).parent.parent
    assert (venv / "bin" / "yolov12-serve").is_file(), "the project is installed in this venv"
    unit = folder / UNIT.name
    unit.write_text((text if text is not None else UNIT.read_text()).replace("/opt/yolov12-serve/.venv", str(venv)))
    return unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (it comes with the systemd package, which a container "
                           "image or CI machine without systemd lacks; too large to install for one check)")
def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    """`systemd-analyze verify` says nothing at all of the unit (an unknown key or value is a warning with exit 0:
    any output fails); a misspelt directive in a copy is caught, so the check can fail."""
    r = _verify(_unit_with_this_venv(tmp_path))
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    r = _verify(_unit_with_this_venv(broken, UNIT.read_text().replace("ProtectSystem=", "ProtectSytem=")))
    assert "ProtectSytem" in r.stdout + r.stderr


def test_unit_file_runs_what_the_server_accepts():
    """The unit's ExecStart, with the example environment file's YOLOV12_ARGS, parses with the server's own
    argument parser (systemd's ${VAR} expanded), state and evidence under StateDirectory, tokens from
    LoadCredential; the notify type, reload, drain and watchdog settings are those docs/production.md describes."""
    from yolov12_serve.cli import build_parser

    text = UNIT.read_text().replace("\\\n", " ")  # continuation lines joined, as systemd joins them
    env = dict(line.split("=", 1) for line in (UNIT.parent / "yolov12-serve.env").read_text().splitlines()
               if line.strip() and not line.startswith("#"))
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    assert settings["Type"] == ["notify"] and settings["NotifyAccess"] == ["main"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert settings["KillMode"] == ["mixed"]  # SIGTERM to the server alone; its device processes it ends itself
    stop_s = int(settings["TimeoutStopSec"][0].removesuffix("s"))
    assert app.DRAIN_S + app.GRPC_GRACE_S < stop_s <= 30
    assert int(settings["WatchdogSec"][0].removesuffix("s")) >= 10
    assert "PYTHONFAULTHANDLER=1" in " ".join(settings["Environment"]).split()  # a watchdog abort shows the stacks
    assert settings["StateDirectory"] == ["yolov12"] and settings["DynamicUser"] == ["yes"]
    argv = settings["ExecStart"][0].split()
    assert argv[0] == "/opt/yolov12-serve/.venv/bin/yolov12-serve"
    expanded: list[str] = []
    for word in argv[1:]:
        if word.startswith("$") and not word.startswith("${"):  # $VAR: split into words
            expanded += env[word[1:]].split()
        else:
            expanded.append(re.sub(r"\$\{(\w+)\}", lambda m: {"CREDENTIALS_DIRECTORY": "/run/credentials/x"}[
                m.group(1)], word))
    args = build_parser().parse_args(expanded)
    assert args.state_dir.startswith("/var/lib/yolov12/") and args.evidence_dir.startswith("/var/lib/yolov12/")
    credentials = {c.split(":")[0] for c in settings["LoadCredential"]}
    assert args.auth_token_file == "/run/credentials/x/tokens" and "tokens" in credentials
    assert args.gpus == "cpu" and args.metrics_host == "127.0.0.1"
