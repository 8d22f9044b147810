"""Which device a stream runs on: the least-loaded one, load = sum over its streams of fps x cost per frame / instances.

Before a stream has run, its fps is its max_fps (or a typical camera's 25); then the frames it offers per
second (not those processed: a camera on an overloaded device loses frames, and looked lighter than it is,
drawing yet more cameras there). A device's cost per frame is measured at warm-up (a camera's input at the
batch size that runs frames fastest). Load 1.0 is a device at capacity; `plan_move` picks the stream whose move
to another device lowers the busiest load most, for a server that rebalances a device staying over capacity.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .errors import UnavailableError

__all__ = ["DEFAULT_FPS", "Placement"]

DEFAULT_FPS = 25.0


@dataclass
class _Device:
    instances: int
    frame_cost_s: float
    healthy: bool = True


class Placement:
    """Tracks expected load per device and picks the least-loaded healthy device for a new or moved stream."""

    def __init__(self) -> None:
        self._devices: dict[str, _Device] = {}
        self._streams: dict[str, tuple[str, float]] = {}  # stream -> (device, expected fps)
        self._lock = threading.Lock()

    def add_device(self, device: str, instances: int, frame_cost_s: float) -> None:
        """Register a device with its engine instances and measured seconds per frame."""
        with self._lock:
            self._devices[device] = _Device(max(1, instances), max(frame_cost_s, 1e-6))

    def set_cost(self, device: str, frame_cost_s: float) -> None:
        """A device's new seconds per frame (another engine after a hot swap)."""
        with self._lock:
            self._devices[device].frame_cost_s = max(frame_cost_s, 1e-6)

    def set_healthy(self, device: str, healthy: bool) -> None:
        """Mark a device usable or not (an engine that keeps failing)."""
        with self._lock:
            self._devices[device].healthy = healthy

    def healthy_devices(self) -> list[str]:
        """Devices that take streams."""
        with self._lock:
            return [d for d, info in self._devices.items() if info.healthy]

    def load(self, device: str) -> float:
        """Expected busy fraction of the device's instances (1.0 = saturated)."""
        with self._lock:
            return self._load(device)

    def _load(self, device: str) -> float:
        info = self._devices[device]
        fps = sum(f for d, f in self._streams.values() if d == device)
        return fps * info.frame_cost_s / info.instances

    def assign(self, stream_id: str, fps: float = 0.0, exclude: tuple[str, ...] = (), any_device: bool = False) -> str:
        """Place a stream on the least-loaded healthy device (ties: the first); returns the device name
        (UnavailableError when none is healthy: AddStream and DetectImage answer UNAVAILABLE). `any_device`: with
        none healthy, the least-loaded of the others (the streams a server starts with: a saved camera refused here
        would be dropped from the saved set; it waits on its device, as the streams already there do)."""
        fps = fps if fps > 0 else DEFAULT_FPS
        with self._lock:
            candidates = [d for d, info in self._devices.items() if info.healthy and d not in exclude]
            if not candidates and any_device:
                candidates = [d for d in self._devices if d not in exclude]
            if not candidates:
                raise UnavailableError("no healthy device to place the stream on (a device out of service is "
                                       "re-checked every --recheck-s): retry in a moment; the health service shows "
                                       "each device's state")
            self._streams.pop(stream_id, None)
            device = min(candidates, key=lambda d: (self._load(d), list(self._devices).index(d)))
            self._streams[stream_id] = (device, fps)
            return device

    def update_fps(self, stream_id: str, fps: float) -> None:
        """Refresh a stream's measured rate (keeps later placements accurate)."""
        with self._lock:
            if stream_id in self._streams and fps > 0:
                self._streams[stream_id] = (self._streams[stream_id][0], fps)

    def move(self, stream_id: str, device: str) -> None:
        """Count a stream on `device` from now on (its expected fps kept)."""
        with self._lock:
            fps = self._streams.get(stream_id, ("", DEFAULT_FPS))[1]
            self._streams[stream_id] = (device, fps)

    def plan_move(self, device: str, movable: set[str], margin: float = 0.05) -> tuple[str, str] | None:
        """(stream, target): the one stream of `movable` on `device` whose move to a healthy device lowers the
        higher of the two loads most, or None when no move makes it lighter by `margin` at least (rates
        measured a little differently must not send a camera back and forth)."""
        with self._lock:
            here = self._load(device)
            src = self._devices[device]
            best: tuple[float, str, str] | None = None
            for target, info in self._devices.items():
                if target == device or not info.healthy:
                    continue
                there = self._load(target)
                for sid, (d, fps) in self._streams.items():
                    if d != device or sid not in movable:
                        continue
                    peak = max(here - fps * src.frame_cost_s / src.instances,
                               there + fps * info.frame_cost_s / info.instances)
                    if peak < here - margin and (best is None or peak < best[0]):
                        best = (peak, sid, target)
            return (best[1], best[2]) if best else None

    def loads(self) -> dict[str, float]:
        """Every device's expected busy fraction."""
        with self._lock:
            return {d: self._load(d) for d in self._devices}

    def release(self, stream_id: str) -> None:
        """Forget a removed stream."""
        with self._lock:
            self._streams.pop(stream_id, None)

    def streams_on(self, device: str) -> list[str]:
        """Streams placed on `device`."""
        with self._lock:
            return [s for s, (d, _) in self._streams.items() if d == device]
