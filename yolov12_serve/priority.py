"""CPU priority: the threads that run inference keep the default; every other thread of the server runs lower.

On CPU the engine instances keep the cores busy, and whatever else woke up (a gRPC send, a camera tick, a
metrics scrape) preempted a run in the middle: that batch ended later, and the frames that had already
waited for an instance were the ones pushed over the SLO. At a lower priority (nice) that work runs in the
gaps and in its smaller fair share instead; it is never starved (nice weights share the CPU, they do not
forbid it), and it is not in a frame's latency (a source stamps a frame when it hands it over; delivery to
watchers comes after publish).

Linux nice values belong to a thread, and a new thread takes its creator's. So the server lowers every
thread it has once the engines are loaded and the workers run, except those (`favour`ed: the workers, and
the threads an engine made while loading, such as ONNX Runtime's intra-op pools); threads started later by
a lowered thread (sources for new streams, gRPC handlers' executors) are lowered too, and threads an engine
starts from its own threads (ONNX Runtime's fixed-shape builder) are not. Raising a priority back needs
CAP_SYS_NICE: a worker started from a lowered thread says so in the log (`keep_default`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable

__all__ = ["favour", "keep_default", "lower_others", "native_threads", "nice_of"]

log = logging.getLogger(__name__)

_favoured: set[int] = set()  # native thread ids left at the default priority
_lock = threading.Lock()


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


def favour(native_ids: Iterable[int]) -> None:
    """Leave these threads at the default priority when the others are lowered."""
    with _lock:
        _favoured.update(native_ids)


def keep_default() -> None:
    """Favour the calling thread (an inference thread); if it inherited a lowered priority, try to undo that."""
    tid = threading.get_native_id()
    favour([tid])
    nice = nice_of(tid)
    if nice and nice > 0:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 0)
        except OSError:  # only CAP_SYS_NICE may raise a priority again
            log.warning("inference thread %d runs at nice %d: it was started from a thread at a lowered "
                        "priority (start workers before priority.lower_others, or from a favoured thread)", tid, nice)


def lower_others(nice: int) -> int:
    """Set every thread of this process but the favoured ones to `nice` (<= 0: change nothing); returns how many
    were set. Threads they start later take the same value."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return 0
    with _lock:
        keep = set(_favoured)
    lowered = 0
    for tid in sorted(native_threads() - keep):
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
            lowered += 1
        except OSError:  # it has just ended
            continue
    log.debug("CPU priority: %d threads at nice %d; threads %s at the default", lowered, nice, sorted(keep))
    return lowered
