"""A fault that repeats is logged on change, never once per retry: its first occurrence and each new reason, then a
summary at growing intervals while it lasts ("still failing: N times since ..."), and one line when it ends.

A camera that stays down for a weekend, or an engine that fails every batch, otherwise writes a line per retry or
per batch for as long as it lasts: thousands of lines a day per camera, millions per failing device, which fill the
journal and hide every other line. The counts stay exact where they are kept (ListStreams, metrics).
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["FaultLog"]

FIRST_SUMMARY_S = 60.0  # the first "still failing" line comes this long after the first failure
MAX_SUMMARY_S = 3600.0  # the interval doubles up to this: about 30 lines in a day of one fault
KNOWN_REASONS = 16  # distinct reasons remembered per episode (each is logged when first seen)


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class FaultLog:
    """The log lines of one repeating fault (thread-safe): `failed(reason)` at every failure, `ok()` at every
    success; `subject % subject_args` starts each line ("stream %s", (stream_id,)): the record's args keep them,
    for filters that pick a camera's lines (yolov12-predict's). A failure within `first_summary_s` of
    a success continues the episode (a camera that drops every few seconds flaps: one episode, not a line pair per
    drop): after its first end is said, the next failure is said too (the log never ends on a recovery while it
    fails), then further ends and failures only with the summaries."""

    def __init__(self, logger: logging.Logger, subject: str, subject_args: tuple[object, ...] = (),
                 level: int = logging.WARNING, recovery_after: int = 1, first_summary_s: float = FIRST_SUMMARY_S,
                 max_summary_s: float = MAX_SUMMARY_S) -> None:
        self.logger, self.subject, self.subject_args, self.level = logger, subject, subject_args, level
        self.recovery_after = recovery_after  # failures an episode needs before its end is logged
        self.first_summary_s, self.max_summary_s = first_summary_s, max_summary_s
        self._lock = threading.Lock()
        self.failures = 0  # in the current episode (0: none)
        self._since = self._next_summary = self._interval = 0.0
        self._wall_since = 0.0
        self._ok_at: float | None = None  # the episode's latest success (None: failing now)
        self._said_ok = False  # its end was logged
        self._last_line_ok = False  # the latest line said it works again
        self._reasons: set[str] = set()
        self._last = ""

    @property
    def failing(self) -> bool:
        """Whether the latest outcome was a failure."""
        return self.failures > 0 and self._ok_at is None

    def failed(self, reason: str, suffix: str = "") -> None:
        """One more failure: logged when it starts an episode or has a reason not seen in it yet, else counted and
        summed up at growing intervals. `suffix` ends a logged line (e.g. "; reconnecting")."""
        t = time.monotonic()
        with self._lock:
            if self._ok_at is not None and t - self._ok_at > self.first_summary_s:
                self.failures = 0  # it worked long enough: a new episode
            again = self._ok_at is not None and self._last_line_ok  # failing after a line said it works
            self._ok_at = None
            self.failures += 1
            self._last = reason
            if self.failures == 1:
                self._since, self._wall_since = t, time.time()
                self._interval = self.first_summary_s
                self._next_summary = t + self._interval
                self._reasons = {reason}
                self._said_ok = False
                line = f"{reason}{suffix}"
            elif again or (reason not in self._reasons and len(self._reasons) < KNOWN_REASONS):
                self._reasons.add(reason)
                line = f"{reason}{suffix}"
            elif t >= self._next_summary:
                self._interval = min(self._interval * 2, self.max_summary_s)
                self._next_summary = t + self._interval
                line = (f"still failing, {self.failures} times since "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self._wall_since))} (last: {reason}); "
                        f"the next summary after {_ago(self._interval)}")
            else:
                return
            self._last_line_ok = False
        self.logger.log(self.level, f"{self.subject}: %s", *self.subject_args, line)

    def ok(self, what: str = "works again") -> None:
        """A success: one INFO line at the end of an episode of `recovery_after` failures or more (in a flapping
        episode, again only when a summary is due). Called at every success (each frame, each batch: healthy, it is
        one attribute read), it ends the episode once it has worked for `first_summary_s`, saying so where the log's
        latest line is still a failure (a flapping source that then stays up)."""
        if not self.failures:  # healthy: the common case, no lock
            return
        t = time.monotonic()
        with self._lock:
            if self.failures == 0:
                return
            if self._ok_at is not None:  # working since _ok_at
                if t - self._ok_at <= self.first_summary_s:
                    return
                failures, lasted, last = self.failures, self._ok_at - self._since, self._last
                self.failures = 0  # steady: the episode is over
                if self._last_line_ok or failures < max(1, self.recovery_after):
                    return
                self._last_line_ok = True
            else:
                self._ok_at = t
                if self.failures < max(1, self.recovery_after) or self._last_line_ok:
                    return
                if self._said_ok:
                    if t < self._next_summary:
                        return
                    self._interval = min(self._interval * 2, self.max_summary_s)
                    self._next_summary = t + self._interval
                self._said_ok = self._last_line_ok = True
                failures, lasted, last = self.failures, t - self._since, self._last
        self.logger.info(f"{self.subject}: %s after %d failure%s over %s (last: %s)", *self.subject_args, what,
                         failures, "" if failures == 1 else "s", _ago(lasted), last)
