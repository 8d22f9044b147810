"""CPU priority: the threads that run inference keep the default; every other thread of the server yields to them.

On CPU the engine instances keep the cores busy, and whatever else woke up (a gRPC send, a camera tick, a
metrics scrape) preempted a run in the middle: that batch ended later, and the frames that had already
waited for an instance were the ones pushed over the SLO. So every other thread runs under SCHED_BATCH
(Linux): a batch thread that wakes never preempts the running one; it waits for the end of the current
slice or a free core, then runs its short piece of work at its full share and sleeps again. It is not
in a frame's latency (a source stamps a frame when it hands it over; delivery to watchers comes after
publish). A lower nice did the first part but not the second: at nice 10 a gRPC or camera thread was
also preempted in the middle of its Python work, holding the GIL, and the inference thread that next
wanted the GIL waited with its core idle (1.0-1.6% of the machine idle at saturation, against 0.4-0.6%).
Alternating runs on our 2 cores (bench/serve.py, three pairs): (a) 0.88 / 0.92 / 0.90 against 0.88 /
0.87 / 0.89 at nice 10, (b) p99 41.3 / 43.8 / 43.6 ms against 45.9 / 46.2 / 46.8. `--background-nice`
still adds a nice value on top (default 0).

Priorities belong to a thread in Linux, and a new thread takes its creator's. So the server lowers every
thread it has once the engines are loaded and the workers run, except those (`favour`ed: the workers, and
the threads an engine made while loading, such as ONNX Runtime's intra-op pools); threads started later by
a lowered thread (sources for new streams, gRPC handlers' executors) are lowered too, and threads an engine
starts from its own threads (ONNX Runtime's fixed-shape builder) are not. A worker started from a lowered
thread returns to the default policy itself; its nice value needs CAP_SYS_NICE to come back down
(`keep_default` says so in the log).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterable

__all__ = ["SWITCH_INTERVAL_S", "favour", "keep_default", "lower_others", "native_threads", "nice_of", "policy_of",
           "shorten_lock_turns"]

log = logging.getLogger(__name__)

_BATCH = getattr(os, "SCHED_BATCH", None)  # Linux only
_favoured: set[int] = set()  # native thread ids left at the default priority
_lock = threading.Lock()
SWITCH_INTERVAL_S = 0.001


def native_threads() -> set[int]:
    """Native ids of this process's threads: all of them on Linux, those Python knows elsewhere."""
    try:
        return {int(tid) for tid in os.listdir("/proc/self/task")}
    except OSError:
        return {t.native_id for t in threading.enumerate() if t.native_id is not None}


def nice_of(native_id: int) -> int | None:
    """The nice value of one thread of this process (None where the platform cannot say)."""
    try:
        return os.getpriority(os.PRIO_PROCESS, native_id)
    except (AttributeError, OSError):
        return None


def policy_of(native_id: int) -> int | None:
    """The scheduling policy of one thread of this process (os.SCHED_OTHER, os.SCHED_BATCH, ...; None: unknown)."""
    try:
        return os.sched_getscheduler(native_id)
    except (AttributeError, OSError):
        return None


def favour(native_ids: Iterable[int]) -> None:
    """Leave these threads at the default priority when the others are lowered."""
    with _lock:
        _favoured.update(native_ids)


def keep_default() -> None:
    """Favour the calling thread (an inference thread); if it inherited a lowered priority, try to undo that."""
    tid = threading.get_native_id()
    favour([tid])
    if _BATCH is not None and policy_of(tid) == _BATCH:  # leaving SCHED_BATCH needs no privilege
        try:
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        except OSError as e:
            log.warning("inference thread %d stays under SCHED_BATCH: %s", tid, e)
    nice = nice_of(tid)
    if nice and nice > 0:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 0)
        except OSError:  # only CAP_SYS_NICE may raise a priority again
            log.warning("inference thread %d runs at nice %d: it was started from a thread at a lowered "
                        "priority (start workers before priority.lower_others, or from a favoured thread)", tid, nice)


def lower_others(nice: int, batch: bool = True) -> int:
    """Put every thread of this process but the favoured ones under SCHED_BATCH (where the OS has it; `batch`) at
    `nice` (0: the default); returns how many were changed. Threads they start later take the same settings."""
    batch = batch and _BATCH is not None
    if not (batch or nice > 0) or not hasattr(os, "setpriority"):
        return 0
    with _lock:
        keep = set(_favoured)
    lowered = 0
    for tid in sorted(native_threads() - keep):
        changed = False
        if batch:
            with contextlib.suppress(OSError):  # it has just ended, or a sandbox forbids the call: nice still helps
                os.sched_setscheduler(tid, _BATCH, os.sched_param(0))
                changed = True
        if nice > 0:
            with contextlib.suppress(OSError):  # it has just ended
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                changed = True
        lowered += changed
    log.debug("CPU priority: %d threads under %s at nice %d; threads %s at the default", lowered,
              "SCHED_BATCH" if batch else "the default policy", nice, sorted(keep))
    return lowered


def shorten_lock_turns(interval_s: float = SWITCH_INTERVAL_S) -> None:
    """Make a thread that holds the interpreter lock hand it over after `interval_s` (Python's default: 5 ms)
    when another waits for it.

    An engine worker lets the lock go in every engine call and large copy and waits for it after each; behind a
    busy thread (camera sources past capacity, a metrics scrape) each wait lasted up to the whole interval, a
    few dozen times a batch. One process, zero-cost model, 1,024 synthetic cameras handing over 25,000
    frames/s on the 2-core VM, rounds taking turns: 3,289 and 3,475 frames/s processed at 5 ms, 3,235 and
    4,201 at 1 ms; the real demo model at 2x its capacity: 136 and 134 frames/s (no cost beyond the noise)."""
    sys.setswitchinterval(interval_s)
