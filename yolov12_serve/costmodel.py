"""Engine run time per (batch size, input shape), learned online; the scheduler asks it what a batch will cost.

Each (shape, batch size, other batches running beside it) keeps its last `window` run times of the
last `horizon_s` seconds (at least the newest one); predictions are quantiles of that window, cached at
each observation: the median (`q=0.5`, a typical run) and the 90th percentile (`q=0.9`, a slow run).
A windowed quantile forgets one slow outlier (a page fault, a noisy neighbour) instead of dragging a
mean for many runs, and the horizon makes a rarely run size forget a slow spell at once: otherwise
runs measured while the CPU was crowded (cameras starting up) kept a size looking too slow to be
chosen, so it was never measured again (the scheduler probes such sizes now and then; one probe after
the horizon replaces them). Runs are told apart by how many other batches shared the device, because
instances can slow each other down (several execution contexts on one GPU): a frame that had to wait
for a free instance runs beside another batch, and predicting it from lone runs would let it start,
then miss its deadline.

Unseen batch sizes are extrapolated from the nearest seen size of the same shape (linear in the
batch: pessimistic on GPUs, where the scheduler then learns the real, smaller figure the first time
slack lets it try); unseen shapes scale a seen shape by pixel count (the same batch size where one
was seen). The server seeds it at start-up with batches 1, 2, 4, ...
"""

from __future__ import annotations

import threading
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Callable

from .frames import now

__all__ = ["RunTimeModel"]

Shape = tuple[int, int]


def _quantile(ordered: list[float], q: float) -> float:
    """Linear-interpolated quantile of a sorted list (numpy's default method)."""
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class _Window:
    __slots__ = ("ordered", "p50", "p90", "times", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.times: deque[tuple[float, float]] = deque()  # (observed at, run seconds), oldest first
        self.ordered: list[float] = []  # the same run times, sorted: kept so, not sorted again per run
        self.p50 = self.p90 = 0.0

    def add(self, seconds: float, at: float, horizon_s: float) -> None:
        self.times.append((at, seconds))
        insort(self.ordered, seconds)
        while len(self.times) > self.window or (len(self.times) > 1 and self.times[0][0] < at - horizon_s):
            _, old = self.times.popleft()
            del self.ordered[bisect_left(self.ordered, old)]
        self.p50, self.p90 = _quantile(self.ordered, 0.5), _quantile(self.ordered, 0.9)

    def get(self, q: float) -> float:
        return self.p50 if q <= 0.5 else self.p90


Plan = tuple[_Window | None, float]  # (the window whose quantile answers, scale); no window: the scale is the answer


class RunTimeModel:
    """Thread-safe online estimate of how long `Engine.infer` takes for a batch of `n` frames of `shape`."""

    def __init__(self, window: int = 64, default_s: float = 0.02, default_shape: Shape = (320, 320),
                 horizon_s: float = 5.0, clock: Callable[[], float] = now) -> None:
        self.window = window
        self.horizon_s = horizon_s
        self.clock = clock
        self.default_s = default_s  # batch-1 guess for default_shape before anything is measured
        self.default_shape = default_shape
        self._stats: dict[tuple[Shape, int, int], _Window] = {}  # (shape, batch, other batches running)
        # How each question (n, shape, others) is answered: kept until a new window appears, as every run adds
        # to a window that exists already once the sizes in use were measured. Plans that weigh windows by
        # their length (an unseen shape) are kept only until the next run is observed.
        self._plans: dict[tuple[int, Shape, int], Plan] = {}
        self._volatile: dict[tuple[int, Shape, int], Plan] = {}
        self._lock = threading.Lock()

    def observe(self, n: int, shape: Shape, seconds: float, others: int = 0) -> None:
        """Record one measured run of a batch of `n` frames of `shape`, while `others` other batches shared the
        device (execution contexts on one GPU slow each other down; two 1-thread ONNX Runtime sessions on 2
        cores hardly do: 26.0 ms alone, 26.5 beside, in one interleaved measurement)."""
        key = ((int(shape[0]), int(shape[1])), int(n), max(0, int(others)))
        with self._lock:
            w = self._stats.get(key)
            if w is None:
                w = self._stats[key] = _Window(self.window)
                self._plans = {}  # new dicts, not clear(): a reader may hold the old one
            w.add(float(seconds), self.clock(), self.horizon_s)
            if self._volatile:
                self._volatile = {}

    def predict(self, n: int, shape: Shape, q: float = 0.9, others: int = 0) -> float:
        """Seconds a batch of `n` frames of `shape` takes beside `others` running batches: q=0.9 a slow run (for
        planning), q=0.5 a typical one. Where this many others were never seen, the nearest fewer stand in.

        Which window answers (and how it is scaled) is worked out once, not per call: a scheduler pick asks
        about a dozen questions per frame it looks at, every finished batch is observed, and at GPU rates picks
        are the server's hot path (a pick of 12 cameras after an observed run: 111-148 -> 62 us)."""
        key = (n, tuple(shape), others)  # a list shape hashes too
        plan = self._plans.get(key) or self._volatile.get(key)
        if plan is None:
            with self._lock:
                plan, stable = self._plan((int(shape[0]), int(shape[1])), int(n), max(0, int(others)))
                (self._plans if stable else self._volatile)[key] = plan
        window, scale = plan
        return scale if window is None else window.get(q) * scale

    def _plan(self, shape: Shape, n: int, others: int) -> tuple[Plan, bool]:
        """How predict() answers (the lock held), and whether that holds until a new window appears."""
        for level in range(others, -1, -1):
            plan = self._same_shape(n, shape, level)
            if plan is not None:
                return plan, True
        level0 = {(sh, m): st for (sh, m, o), st in self._stats.items() if o == 0}
        other = [(sh, st) for (sh, m), st in level0.items() if m == n]
        if other:  # the same batch size at another shape, scaled by pixels (keeps batching efficiency)
            sh, st = max(other, key=lambda x: len(x[1].times))
            return (st, (shape[0] * shape[1]) / (sh[0] * sh[1])), len(other) == 1
        if level0:
            (sh, m), st = max(level0.items(), key=lambda kv: (len(kv[1].times), -kv[0][1]))
            pixels = (shape[0] * shape[1]) / (sh[0] * sh[1])
            return (st, pixels * max(1.0, n / m)), len(level0) == 1
        pixels = (shape[0] * shape[1]) / (self.default_shape[0] * self.default_shape[1])
        return (None, self.default_s * pixels * n), True

    def age(self, n: int, shape: Shape, others: int = 0) -> float:
        """Seconds since a batch of `n` frames of `shape` beside `others` batches was last measured (inf: never)."""
        with self._lock:
            w = self._stats.get(((int(shape[0]), int(shape[1])), int(n), max(0, int(others))))
            return self.clock() - w.times[-1][0] if w is not None else float("inf")

    def _same_shape(self, n: int, shape: Shape, others: int) -> Plan | None:
        """This (n, shape, others) as measured, or linear from the nearest measured batch size; None if unseen."""
        w = self._stats.get((shape, n, others))
        if w is not None:
            return w, 1.0
        same = [(m, st) for (sh, m, o), st in self._stats.items() if sh == shape and o == others]
        if not same:
            return None
        below = [(m, st) for m, st in same if m <= n]
        m, st = max(below, key=lambda x: x[0]) if below else min(same, key=lambda x: x[0])
        return st, max(1.0, n / m)

    def known(self) -> dict[tuple[Shape, int, int], tuple[float, float, int]]:
        """Snapshot {(shape, n, others): (median s, p90 s, samples)} for status pages and benchmarks."""
        with self._lock:
            return {k: (w.p50, w.p90, len(w.times)) for k, w in self._stats.items()}
