"""A camera that streams but shows nothing: its picture blank (a lens cap, a dead sensor, a black or flat frame) or
frozen (an encoder that sends the same frame again and again). The stall watchdog cannot see these: frames keep
coming. Every `PICTURE_CHECK_S` or so (unevenly: a looped recording must not show the same frame at each sample)
a stream's next frame is sampled small and grey (preprocess.small_grey, in the source's thread: ~15 us from a
1080p frame on the AMD EPYC VM); a problem that lasts `after_s` is reported (ListStreams `picture_problem`, the metric
`yolov12_stream_picture_problem`, a log line), and cleared with the first good sample."""

from __future__ import annotations

import numpy as np

__all__ = ["BLANK_STD", "PICTURE_CHECK_S", "PROBLEMS", "PictureCheck"]

PICTURE_CHECK_S = 2.0  # seconds between a stream's samples
BLANK_STD = 2.0  # grey levels: a picture this flat shows nothing (a real scene, even dark, varies more)
PROBLEMS = ("blank", "frozen")


class PictureCheck:
    """One stream's samples: `add(grey, t)` returns the problem to report now ("" for none), once it has lasted
    `after_s` (a camera's exposure blink or a static scene for a moment is not one)."""

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self.reported = ""
        self._last: np.ndarray | None = None
        self._seen: str = ""  # the problem of the latest sample ("" none)
        self._since = 0.0  # when that problem began

    def add(self, grey: np.ndarray, t: float) -> str:
        problem = self.classify(grey)
        self._last = grey
        if problem != self._seen:
            self._seen, self._since = problem, t
        self.reported = problem if problem and t - self._since >= self.after_s else ""
        return self.reported

    def classify(self, grey: np.ndarray) -> str:
        """"blank", "frozen" (exactly the previous sample: sensor noise alone makes live frames differ) or ""."""
        if float(grey.std()) < BLANK_STD:
            return "blank"
        if self._last is not None and self._last.shape == grey.shape and np.array_equal(self._last, grey):
            return "frozen"
        return ""
