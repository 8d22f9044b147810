"""What a camera shows as tags to a plant's SCADA, read one way for OPC UA (opcua.py) and Sparkplug B (sparkplug.py):
a camera's tag reads the same whichever of them Ignition or a PLC takes it from.

States (State, Streaming, Reconnects, PictureProblem, LastError) are cheap to read and compared often; rates (Fps,
LatencyP99Ms) take a snapshot of the stream's statistics and are read about once a second. A tracked camera's
objects (Objects, ObjectsByClass/<class>, LastObject) are counted from its results by an ObjectTally: the objects of
yolov12_objects_total and MQTT's objects topic, counted since the camera was added (or the tally made).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .frames import FrameResult

__all__ = ["LastObject", "ObjectTally", "camera_rates", "camera_states"]


def camera_states(stream: Any) -> dict[str, Any]:
    """A camera's state tags now: {State, Streaming, Reconnects, PictureProblem ('', blank, frozen), LastError}."""
    state = stream.state.name
    return {"State": state, "Streaming": state == "STREAMING", "Reconnects": int(stream.reconnects),
            "PictureProblem": stream.picture_problem, "LastError": stream.last_error}


def camera_rates(stream: Any) -> dict[str, float]:
    """A camera's rates now, to 2 decimals (a change below that is no news): {Fps, LatencyP99Ms}."""
    view = stream.view()
    return {"Fps": round(view.fps, 2), "LatencyP99Ms": round(view.latency_p99_ms, 2)}


@dataclass(frozen=True)
class LastObject:
    """The newest object a tracked camera counted."""

    class_name: str
    score: float
    track_id: int
    capture_time_s: float  # the frame's capture time, seconds since the epoch (UTC)


@dataclass
class ObjectTally:
    """A tracked camera's objects, each counted once when a result first shows its track id."""

    objects: int = 0
    by_class: dict[str, int] = field(default_factory=dict)
    last: LastObject | None = None
    _seen: set[int] = field(default_factory=set)

    def count(self, result: FrameResult, names: Callable[[FrameResult], dict[int, str]]) -> list[str]:
        """Count the objects `result` shows first; returns their class names (empty: none new). `names(result)`:
        the class names of the model that produced it, looked up only when there is something new."""
        if result.track_ids is None or result.error or not len(result.track_ids):
            return []
        new = [(row, tid) for row, tid in enumerate(result.track_ids.tolist()) if tid and tid not in self._seen]
        if not new:
            return []
        classes = names(result)
        found = []
        for row, tid in new:
            self._seen.add(tid)
            class_id = int(result.detections[row, 5])
            name = classes.get(class_id, str(class_id))
            self.by_class[name] = self.by_class.get(name, 0) + 1
            self.objects += 1
            found.append(name)
        row, tid = new[-1]
        at = result.capture_time_us / 1e6 if result.capture_time_us else time.time()
        self.last = LastObject(found[-1], float(result.detections[row, 4]), tid, at)
        if len(self._seen) > 8192:  # ids far behind the newest never come back (a tracker forgets after a second)
            keep = sorted(self._seen)[-4096:]
            self._seen.clear()
            self._seen.update(keep)
        return found
