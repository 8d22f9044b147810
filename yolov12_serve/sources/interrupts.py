"""PyAV's interrupt callback, steered. FFmpeg asks it, all through every blocking open and read, whether to give up;
PyAV answers from the clock (its open and read timeouts, `time.monotonic()`). This module hands PyAV a clock that
can say "time is up" early: for one thread (a camera redirected to a refused host: redirects.py) or for every
thread (the server stopping: a camera thread still inside FFmpeg when the interpreter is torn down has the callback
call into a Python that is gone, and the process ends in a segmentation fault).

Reading the clock is what PyAV 13-18 do in `av.container.core.interrupt_cb`; where a release does otherwise,
`install()` says so (False) and the callers fall back to what they do without it.
"""

from __future__ import annotations

import threading
import time

__all__ = ["install", "interrupt_all", "interrupt_this_thread"]

_local = threading.local()  # .on: this thread's FFmpeg calls are to give up
_everyone = threading.Event()
_installed: bool | None = None
_lock = threading.Lock()


class _Clock:
    """`time` as PyAV's interrupt callback sees it."""

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    @staticmethod
    def monotonic() -> float:
        if _everyone.is_set() or getattr(_local, "on", False):
            return float("inf")
        return time.monotonic()


def install() -> bool:
    """Put the clock in PyAV's hands (once); False when this PyAV does not read it."""
    global _installed
    with _lock:
        if _installed is None:
            import av.container.core

            _installed = getattr(av.container.core, "time", None) is time
            if _installed:
                av.container.core.time = _Clock()
        return _installed


def interrupt_this_thread(on: bool) -> None:
    """Make this thread's FFmpeg calls give up at their next check (True) or run as usual again (False)."""
    _local.on = on


def interrupt_all(on: bool = True) -> None:
    """Make every thread's FFmpeg calls give up from now on (the process is stopping), or no longer (False)."""
    if on:
        _everyone.set()
    else:
        _everyone.clear()
