"""Faults injected into real engines (no tests here): a wrapper whose `infer` is slowed, blocked or failed by
switches the test flips, for the failure paths that need a GPU or a rare event (DESIGN.md: "an engine call that
never returns").

In a server subprocess the switches are files in a folder (`YOLOV12_TEST_FAULTS`), named per device with ':'
written '-' (`hang-cpu-1`, `delay-cpu-0` holding seconds per frame, `fail-cpu-1`, `refuse-192x320` for one
input shape on every device). `install()` wraps the server's default engine loader with `FaultyEngine`, and has
device processes (--worker-processes) open their engines with `load` (ServerConfig.engine_loader: they inherit the
environment and sys.path); `ServerProcess(..., faults=folder)` starts a server that calls it first. In-process
tests flip the same files.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from engines.base import Engine

ENV = "YOLOV12_TEST_FAULTS"
POLL_S = 0.01


def switch_name(kind: str, device: str) -> str:
    """The file that turns fault `kind` on for `device` ('hang', 'delay', 'fail')."""
    return f"{kind}-{device.replace(':', '-')}"


class FaultyEngine(Engine):
    """A real engine behind switches: `hang-DEV` blocks every call while the file exists (a CUDA call that never
    returns), `fail-DEV` raises, `delay-DEV` sleeps that many seconds per frame first (frames stay in flight
    longer; a device fills with few frames, and batching gains nothing, as on a CPU),
    `refuse-HxW` raises for inputs of that shape only (a shape the engine cannot run)."""

    def __init__(self, inner: Engine, device: str, control: Path) -> None:
        self.inner = inner
        self.info = inner.info
        self.device = device
        self.instances = inner.instances
        self.control = control
        self.path = getattr(inner, "path", None)
        self.calls = 0

    def _on(self, kind: str) -> Path | None:
        path = self.control / switch_name(kind, self.device)
        return path if path.exists() else None

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        self.calls += 1
        while self._on("hang") is not None:
            time.sleep(POLL_S)
        if self._on("fail") is not None:
            raise RuntimeError(f"injected failure on {self.device}")
        h, w = batch.shape[1:3]
        if (self.control / f"refuse-{h}x{w}").exists():
            raise RuntimeError(f"injected: this engine cannot run a {h}x{w} input")
        delay = self._on("delay")
        if delay is not None:
            time.sleep(float(delay.read_text() or 0) * len(batch))
        return self.inner.infer(batch)

    def close(self) -> None:
        self.inner.close()


def load(path: str, device: str = "cpu", instances: int = 1, **opts) -> Engine:
    """The engine loader of device processes (`fault_injection:load`): the real engine behind the switches."""
    from yolov12_serve import core

    return FaultyEngine(core._default_loader(path, device=device, instances=instances, **opts), device,
                        Path(os.environ[ENV]))


def install() -> None:
    """Wrap the server's default engine loader (call before the server starts) when ENV names a folder."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    from yolov12_serve import cli, core

    real = core._default_loader
    control = Path(folder)

    def wrapped(path: str, device: str = "cpu", instances: int = 1, **opts) -> Engine:
        return FaultyEngine(real(path, device=device, instances=instances, **opts), device, control)

    core._default_loader = wrapped
    parse = cli.parse_config

    def parse_config(args):  # device processes open their engines with `load` (they do not run install())
        config, streams = parse(args)
        config.engine_loader = "fault_injection:load"
        return config, streams

    cli.parse_config = parse_config
