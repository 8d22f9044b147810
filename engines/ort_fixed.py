"""Single-frame ONNX Runtime sessions with every input dimension fixed, built for shapes that keep coming.

With symbolic batch/height/width, ONNX Runtime runs the graph's shape arithmetic (Shape, Gather,
Concat, Reshape chains around attention and the head) on every call: 940 nodes for yolov12n. With the
dimensions fixed it folds them away (484 nodes) and a single 192x320 frame runs 3.7-4.8% faster on one
thread (paired calls, 2 threads busy; bench/engines.py); at batch 2 nothing is gained, so only single
frames get these sessions. Once a shape has been run `after` times, a background thread builds one
session per instance for it (0.3 s and ~29 MB each here: the demo server 311 -> 369 MB); calls use
the dynamic session until then. Where sessions run single-threaded (the 2-core default), the build
runs at idle priority: at normal priority it took CPU from the instances for 0.6 s and showed as a
latency spike (demo, 8 s: p99 52-70 ms against 33-48). Multi-threaded sessions would inherit the
builder's priority in their thread pools, so theirs build at normal priority (one core of many).
A process that exits while ONNX Runtime builds in that thread aborts (status 134): `close` waits for a
build in progress, and every set still open is closed at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["FixedShapeSessions"]

log = logging.getLogger(__name__)
_open_sets: weakref.WeakSet[FixedShapeSessions] = weakref.WeakSet()
CLOSE_WAIT_S = 30.0  # a build of every instance's session takes about a second; idle priority may stretch it


class FixedShapeSessions:
    """Per-instance sessions keyed by the exact feed shape; `get` is lock-free, `saw` counts and schedules builds.

    `build(shape)` makes one session for `shape` (called once per instance); `instances` is the number
    of instances; at most `max_shapes` shapes are specialised (each costs a session per instance);
    `idle_priority` builds only with CPU nobody else wants (Linux SCHED_IDLE; only safe for sessions
    without intra-op thread pools, which would inherit it).
    """

    def __init__(self, build: Callable[[tuple[int, ...]], Any], instances: int, after: int = 50,
                 max_shapes: int = 4, idle_priority: bool = False) -> None:
        self._build = build
        self._idle_priority = idle_priority
        self._after = max(1, int(after))
        self._max_shapes = max_shapes
        self._sessions: list[dict[tuple[int, ...], Any]] = [{} for _ in range(instances)]
        self._counts: dict[tuple[int, ...], int] = {}
        self._lock = threading.Lock()
        self._building = threading.Lock()  # one build at a time: less CPU taken from serving, no lost update
        self._closed = False
        self._failed = False
        _open_sets.add(self)

    def get(self, instance: int, shape: tuple[int, ...]) -> Any | None:
        """The fixed-shape session of `instance` for `shape`, or None (not built yet, or not a single frame)."""
        return self._sessions[instance].get(shape)

    def saw(self, shape: tuple[int, ...]) -> None:
        """Count one dynamic-session call on a single frame of `shape`; the `after`-th starts its build."""
        if shape[0] != 1 or self._failed or self._closed:
            return
        with self._lock:
            n = self._counts.get(shape, 0) + 1
            self._counts[shape] = n
            start = n == self._after and sum(c >= self._after for c in self._counts.values()) <= self._max_shapes
        if start:
            threading.Thread(target=self._build_all, args=(shape,), daemon=True, name="ort-fixed-shape").start()

    def _build_all(self, shape: tuple[int, ...]) -> None:
        if self._idle_priority:
            with contextlib.suppress(AttributeError, OSError):  # not Linux: normal priority
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
        with self._building:
            for i in range(len(self._sessions)):
                if self._closed or self._failed:
                    return
                try:
                    session = self._build(shape)
                except Exception as e:  # the dynamic session still serves: say it once and stop specialising
                    self._failed = True
                    log.warning("fixed-shape session for %s could not be built (%s: %s); the dynamic one serves",
                                shape, type(e).__name__, e)
                    return
                if not self._closed:
                    self._sessions[i] = {**self._sessions[i], shape: session}  # copy-on-write: readers take no lock
            log.info("single frames of shape %s now run on fixed-shape sessions (%d built)", shape,
                     len(self._sessions))

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """The shapes every instance has a fixed session for."""
        return sorted(set.intersection(*(set(s) for s in self._sessions))) if self._sessions else []

    def close(self) -> None:
        """Stop building (waiting for a build under way: ONNX Runtime must not be mid-build at exit) and drop
        the sessions."""
        self._closed = True
        if self._building.acquire(timeout=CLOSE_WAIT_S):
            self._building.release()
        self._sessions = [{} for _ in self._sessions]


@atexit.register
def _close_open_sets() -> None:
    for sessions in list(_open_sets):
        sessions.close()
