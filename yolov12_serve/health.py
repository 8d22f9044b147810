"""One device's engine health: healthy, suspect, failed or hung, and what moves it between them.

A device fails when `threshold` batches in a row fail (any batch that runs resets the streak), or at once when a
run hangs (the supervisor: supervisor.py). A failed or hung device takes no streams until a probe of the shape
that failed works again (a probe of another shape could pass while the fault stays), or until a batch started
after the fault runs (the streams that had nowhere else to go). Failures in a row that are all of one input shape
make the device only *suspect*: one camera whose frames the engine cannot run must not fail a device and then,
moved, the next one. A probe of a shape the device has run (the warm-up's) tells them apart: it runs, so the shape
is refused on this device (its frames keep failing alone, attributed to their streams, and no longer count
towards the streak; one that runs lifts it); it fails or hangs, so the device has failed.

The class only decides; the server acts on its verdicts (moves streams, starts probes, flips health).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .frames import now

__all__ = ["DeviceHealth", "DeviceState", "Fault", "Verdict"]

Shape = tuple[int, int]


class DeviceState(enum.Enum):
    """Where a device stands (GetServerInfo's device status; yolov12_device_healthy says whether it takes streams)."""

    HEALTHY = "healthy"
    SUSPECT = "suspect"  # failures in a row, all of one shape: a probe of a known shape decides (still serving)
    FAILED = "failed"  # the engine keeps raising
    HUNG = "hung"  # an engine run passed its deadline


class Verdict(enum.Enum):
    """What the server should do after an event."""

    NONE = "none"
    PROBE = "probe"  # run `DeviceHealth.probe_plan`'s batch off the hot paths and report it with `probed`
    UNHEALTHY = "unhealthy"  # move the device's streams away; it takes no new ones
    RECOVERED = "recovered"  # the device takes streams again


@dataclass(frozen=True)
class Fault:
    """Why a device is not healthy: its state, the error, the batch that showed it and when."""

    state: DeviceState
    error: str
    shape: Shape
    size: int
    since: float


class DeviceHealth:
    """The failure streak and state of one device (thread-safe)."""

    def __init__(self, device: str, threshold: int = 3, clock: Callable[[], float] = now) -> None:
        self.device = device
        self.threshold = max(1, int(threshold))
        self.clock = clock
        self.state = DeviceState.HEALTHY
        self.fault: Fault | None = None
        self.streak = 0
        self._streak_shapes: set[Shape] = set()
        self._refused: set[Shape] = set()
        self._lock = threading.Lock()

    @property
    def healthy(self) -> bool:
        """True while the device takes streams (a suspect one still does)."""
        return self.state in (DeviceState.HEALTHY, DeviceState.SUSPECT)

    @property
    def refused_shapes(self) -> frozenset[Shape]:
        """Input shapes whose failures are the frames' own on this device, not the device's."""
        with self._lock:
            return frozenset(self._refused)

    def succeeded(self, shape: Shape, started_at: float) -> Verdict:
        """A batch of `shape` that started at `started_at` ran."""
        with self._lock:
            self.streak = 0
            self._streak_shapes.clear()
            self._refused.discard(shape)
            if self.state is DeviceState.SUSPECT and self.fault is not None:
                if shape != self.fault.shape:  # another shape runs: the suspect shape is the fault
                    self._refused.add(self.fault.shape)
                self._become_healthy()
                return Verdict.NONE
            if not self.healthy and self.fault is not None and started_at > self.fault.since:
                self._become_healthy()
                return Verdict.RECOVERED
            return Verdict.NONE

    def failed(self, error: str, shape: Shape, size: int) -> Verdict:
        """A batch of `size` frames of `shape` raised `error`."""
        with self._lock:
            if shape in self._refused:
                return Verdict.NONE  # already known to be that shape's fault
            self.streak += 1
            self._streak_shapes.add(shape)
            if self.state is not DeviceState.HEALTHY or self.streak < self.threshold:
                return Verdict.NONE
            if len(self._streak_shapes) == 1:
                self.state = DeviceState.SUSPECT
                self.fault = Fault(DeviceState.SUSPECT, error, shape, size, self.clock())
                return Verdict.PROBE
            self.state = DeviceState.FAILED
            self.fault = Fault(DeviceState.FAILED, error, shape, size, self.clock())
            return Verdict.UNHEALTHY

    def hung(self, error: str, shape: Shape, size: int) -> Verdict:
        """A run of `size` frames of `shape` passed its deadline."""
        with self._lock:
            if not self.healthy:
                return Verdict.NONE  # already out of service (a probe that hangs as well)
            self.state = DeviceState.HUNG
            self.fault = Fault(DeviceState.HUNG, error, shape, size, self.clock())
            return Verdict.UNHEALTHY

    def probe_plan(self, known_shapes: list[Shape]) -> tuple[Shape, int] | None:
        """The batch to probe now, (shape, size): a suspect device runs the first of `known_shapes` (shapes it ran
        at warm-up) that is not the suspect one, a failed or hung one the batch that failed; None when healthy."""
        with self._lock:
            if self.fault is None or self.state is DeviceState.HEALTHY:
                return None
            if self.state is DeviceState.SUSPECT:
                other = [s for s in known_shapes if s != self.fault.shape]
                return (other[0], 1) if other else (self.fault.shape, self.fault.size)
            return self.fault.shape, self.fault.size

    def probed(self, ok: bool, error: str = "") -> Verdict:
        """The result of the probe `probe_plan` asked for (a probe that hung is reported through `hung`)."""
        with self._lock:
            fault = self.fault
            if fault is None or self.state is DeviceState.HEALTHY:
                return Verdict.NONE
            if self.state is DeviceState.SUSPECT:
                if ok:  # the device runs a shape it knows: the suspect shape is refused, not the device
                    self._refused.add(fault.shape)
                    self._become_healthy()
                    return Verdict.NONE
                self.state = DeviceState.FAILED
                self.fault = Fault(DeviceState.FAILED, error or fault.error, fault.shape, fault.size, self.clock())
                return Verdict.UNHEALTHY
            if ok:
                self._become_healthy()
                return Verdict.RECOVERED
            return Verdict.NONE

    def reset(self) -> Verdict:
        """A new engine was loaded and warmed up on the device: whatever failed before is gone."""
        with self._lock:
            was = self.healthy
            self._become_healthy()
            self._refused.clear()
            return Verdict.NONE if was else Verdict.RECOVERED

    def _become_healthy(self) -> None:
        self.state = DeviceState.HEALTHY
        self.fault = None
        self.streak = 0
        self._streak_shapes.clear()
