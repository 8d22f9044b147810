"""Deadlines on engine runs: every `Engine.infer` the server makes is registered with a deadline, and a thread of
its own finds the runs past it (a CUDA or TensorRT call that never returns raises nothing: only a clock sees it).

A run's deadline is `factor` times what the run-time model expects of the batch (its 90th percentile), but never
less than `floor_s`: a busy CPU or a first run of a shape can take several typical runs, a hung one takes
forever. When a run passes its deadline the supervisor claims it and calls `on_hung(run)` (from its own thread,
never from a worker or the watchdog); when the run comes back later anyway, `end(run)` answers False and its
caller does nothing more with it (its frames were answered, its thread replaced). Claiming is one step under a
lock: a run is either finished by its caller or declared hung, never both.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .frames import now

__all__ = ["Run", "RunDeadline", "RunSupervisor"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunDeadline:
    """How long a run may take: max(floor_s, factor x its expected slow run)."""

    floor_s: float = 2.0
    factor: float = 10.0

    def __call__(self, expected_s: float) -> float:
        return max(self.floor_s, self.factor * max(0.0, expected_s))


@dataclass(eq=False)
class Run:
    """One engine call in progress: where, what shape, since when, until when, and for whom (`owner`: the batch,
    or the probe, that the caller will answer)."""

    device: str
    shape: tuple[int, int]
    size: int
    deadline_s: float
    owner: Any = None
    thread: threading.Thread = field(default_factory=threading.current_thread)
    started: float = field(default_factory=now)

    @property
    def overdue_at(self) -> float:
        return self.started + self.deadline_s

    def describe(self) -> str:
        """'batch of 2 at 192x320 on cpu:1' (for log lines and error results)."""
        return f"batch of {self.size} at {self.shape[0]}x{self.shape[1]} on {self.device}"


class RunSupervisor:
    """Registry of runs in progress and the thread that finds the overdue ones (one per server)."""

    def __init__(self, on_hung: Callable[[Run], None], period_s: float = 0.1) -> None:
        self.on_hung = on_hung
        self.period_s = period_s
        self._runs: set[Run] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def begin(self, device: str, shape: tuple[int, int], size: int, deadline_s: float, owner: Any = None) -> Run:
        """Register a run about to start on the calling thread."""
        run = Run(device, (int(shape[0]), int(shape[1])), size, deadline_s, owner)
        with self._lock:
            self._runs.add(run)
        return run

    def end(self, run: Run) -> bool:
        """The run returned: True when its caller still owns the outcome, False when it was declared hung."""
        with self._lock:
            if run in self._runs:
                self._runs.remove(run)
                return True
            return False

    def running(self, device: str | None = None) -> list[Run]:
        """Runs in progress (on `device`), oldest first."""
        with self._lock:
            runs = [r for r in self._runs if device is None or r.device == device]
        return sorted(runs, key=lambda r: r.started)

    def check(self, t: float | None = None) -> list[Run]:
        """Claim the runs past their deadline at `t` and report each to `on_hung`; returns them."""
        t = now() if t is None else t
        with self._lock:
            overdue = [r for r in self._runs if t > r.overdue_at]
            self._runs.difference_update(overdue)
        for run in sorted(overdue, key=lambda r: r.started):
            try:
                self.on_hung(run)
            except Exception:  # the supervisor must outlive any one report
                log.exception("handling the hung %s failed", run.describe())
        return overdue

    def start(self) -> None:
        """Start checking every `period_s` in a daemon thread."""
        self._thread = threading.Thread(target=self._loop, name="run-supervisor", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.check()

    def stop(self) -> None:
        """End the checking thread (runs in progress stay registered)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
