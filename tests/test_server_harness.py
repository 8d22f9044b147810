"""Helpers (no tests) for the server tests: the real `yolov12-serve` in a subprocess with torch import blocked,
the model it serves, and polling. Imported by test_api.py, test_rtsp.py and test_server.py."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "yolov12_serve" / "assets" / "demo.onnx"
CLASS_NAMES = {0: "scratch", 1: "dent", 2: "crack", 3: "stain", 4: "missing_part"}

# The serving path must not import torch: every server these tests start has it blocked.
NO_TORCH = "import sys; sys.modules['torch'] = None; "
SERVE = NO_TORCH + "from yolov12_serve.cli import main; sys.exit(main(sys.argv[1:]))"
# the same with engines behind fault switches (tests/fault_injection.py)
SERVE_WITH_FAULTS = (NO_TORCH + f"sys.path.insert(0, {str(ROOT / 'tests')!r}); import fault_injection; "
                     "fault_injection.install(); from yolov12_serve.cli import main; sys.exit(main(sys.argv[1:]))")


def model_path() -> Path:
    """The bundled demo model; where it is not there yet, a random yolov12n exported once to a temp cache."""
    if DEMO_MODEL.is_file():
        return DEMO_MODEL
    cache = Path(tempfile.gettempdir()) / "yolov12-serve-tests" / "standin-yolov12n-320.onnx"
    if not cache.is_file():
        import torch

        from trainer.export import export
        from trainer.nn.builder import build_model

        torch.manual_seed(0)
        model = build_model("yolov12n.yaml", nc=5, names=CLASS_NAMES)
        with torch.no_grad():
            for seq in model.head.cv3:  # raise class scores so a random model still outputs boxes
                seq[-1].bias.fill_(-0.4)
        cache.parent.mkdir(parents=True, exist_ok=True)
        export(model, format="onnx", imgsz=320, batch=16, dynamic=True, output=cache)
    return cache


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll `predicate` until it returns something truthy (returned); AssertionError after `timeout`."""
    end = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < end:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout:.0f} s (last: {last!r})")


class ServerProcess:
    """`yolov12-serve` on loopback with free ports, torch blocked; stdout is collected in `self.output`."""

    def __init__(self, *args: str, model: Path | None = None, startup_s: float = 90.0,
                 faults: Path | None = None, env: dict[str, str] | None = None, wait: bool = True) -> None:
        """`faults`: a folder of fault switches for the engines (tests/fault_injection.py); `env`: variables added
        to the server's environment. Unless `args` name a --state-dir or --no-state, the server keeps its streams in
        a fresh temporary folder (never the user's). `wait` False: return once the process runs (`wait_started`
        waits for its start line)."""
        given = "--engines" in args or ("--demo" in args and model is None)  # an engine per device, or the demo's
        engines = [] if given else ["--engines", str(model or model_path())]
        gpus = [] if "--gpus" in args else ["--gpus", "cpu"]
        self.state_dir: str | None = None
        if "--state-dir" not in args and "--no-state" not in args:
            self.state_dir = tempfile.mkdtemp(prefix="yolov12-serve-state-")
            args = (*args, "--state-dir", self.state_dir)
        cmd = [sys.executable, "-c", SERVE if faults is None else SERVE_WITH_FAULTS, "--host", "127.0.0.1",
               "--port", "0", "--metrics-port", "0", *gpus, *engines, *args]
        self.stderr = tempfile.NamedTemporaryFile("w+", prefix="yolov12-serve-", suffix=".log", delete=False)  # noqa: SIM115 - lives as long as the server
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if faults is not None:
            from fault_injection import ENV

            env[ENV] = str(faults)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env, cwd=ROOT)
        self.output: list[str] = []
        self._ready = threading.Event()
        self.port = self.metrics_port = 0
        threading.Thread(target=self._read, daemon=True).start()
        if wait:
            self.wait_started(startup_s)

    def wait_started(self, startup_s: float = 90.0) -> None:
        """Wait for the start line (gRPC and metrics ports); AssertionError with the log if it does not come."""
        if not self._ready.wait(startup_s):
            self.kill()
            raise AssertionError(f"server did not start in {startup_s:.0f} s:\n{self.log()}")
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            at = r"(?:[\d.]+|\[[0-9a-f:]+\])"  # an IPv6 address bracketed
            m = re.search(rf"gRPC on {at}:(\d+), metrics (?:on {at}:(\d+)|off)", line)
            if m:
                self.port, self.metrics_port = int(m.group(1)), int(m.group(2) or 0)
                self._ready.set()
        self._ready.set()  # exited

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **kw):
        from yolov12_serve.client import Client

        return Client(self.address, **kw)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def log(self) -> str:
        self.stderr.flush()
        return "".join(self.output) + Path(self.stderr.name).read_text()[-6000:]

    def terminate(self, timeout: float = 15.0) -> tuple[int, float]:
        """SIGTERM; returns (exit status, seconds it took)."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server ignored SIGTERM for {timeout:.0f} s:\n{self.log()}") from None
        return rc, time.monotonic() - t0

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(AssertionError):
                self.terminate()
        self.stderr.close()
        with contextlib.suppress(OSError):
            os.unlink(self.stderr.name)
        if self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)


def has_ipv6_loopback() -> bool:
    """Whether ::1 can be bound here (IPv6 tests skip where a container has no IPv6)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False
