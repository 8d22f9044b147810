"""The live status table (stream, state, fps, p50/p99 latency, detections, objects, drops) and the end-of-run
summary."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TextIO

from .stream import Stream, StreamView

__all__ = ["StatusPrinter", "render_summary", "render_table"]

_HEADER = f"{'stream':<16} {'state':<12} {'device':<7} {'fps':>6} {'p50 ms':>7} {'p99 ms':>7} {'dets/f':>6} " \
          f"{'objects':>7} {'done':>7} {'dropped':>7}  last error"


def render_table(views: Iterable[StreamView], slo_ms: float, title: str = "") -> str:
    """A title with totals, then one line per stream over the last few seconds; p99 above the SLO flagged '!'."""
    views = list(views)
    total = sum(v.fps for v in views)
    lines = [f"{title}{len(views)} streams, {total:.1f} results/s, SLO {slo_ms:g} ms", _HEADER]
    for v in views:
        flag = "!" if v.latency_p99_ms > slo_ms else " "
        state = v.picture_problem.upper() or v.state.name  # BLANK / FROZEN: streaming, but it shows nothing
        lines.append(f"{v.stream_id[:16]:<16} {state:<12} {v.device:<7} {v.fps:>6.1f} {v.latency_p50_ms:>7.1f} "
                     f"{v.latency_p99_ms:>6.1f}{flag} {v.detections_per_frame:>6.1f} "
                     f"{str(v.objects) if v.track else '-':>7} {v.frames_processed:>7} "
                     f"{v.frames_dropped:>7}  {v.last_error[:60]}")
    if len(lines) == 2:
        lines.append("(no streams)")
    return "\n".join(lines)


def render_summary(streams: Iterable[Stream], slo_ms: float, seconds: float) -> str:
    """Whole-run figures per stream and in total, with the drop reasons."""
    lines = [f"summary after {seconds:.1f} s (SLO {slo_ms:g} ms)",
             f"{'stream':<16} {'frames':>7} {'fps':>6} {'p50 ms':>7} {'p99 ms':>7} {'dets/f':>6} {'objects':>7}  "
             "dropped"]
    total = 0
    for s in streams:
        life = s.stats.lifetime()
        total += life.processed
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(life.dropped_by_reason.items())) or "0"
        lines.append(f"{s.stream_id[:16]:<16} {life.processed:>7} {life.fps:>6.1f} {life.latency_p50_ms:>7.1f} "
                     f"{life.latency_p99_ms:>7.1f} {life.detections_per_frame:>6.1f} "
                     f"{str(s.objects) if s.tracker is not None else '-':>7}  {reasons}")
    lines.append(f"total: {total} frames published, {total / seconds if seconds > 0 else 0:.1f} results/s")
    return "\n".join(lines)


class StatusPrinter:
    """Redraws the table in place on a terminal; elsewhere (logs, pipes) prints a fresh block each time."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.tty = hasattr(self.out, "isatty") and self.out.isatty()

    def show(self, table: str) -> None:
        """Print `table` (in place on a terminal)."""
        if self.tty:
            self.out.write("\x1b[H\x1b[2J" + table + "\n")
        else:
            self.out.write(table + "\n\n")
        self.out.flush()
