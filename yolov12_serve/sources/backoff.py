"""Exponential backoff with jitter, capped: how long to wait before reconnecting a camera after the n-th failure."""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Delays base, 2*base, 4*base ... up to `cap`, each drawn uniformly from [d/2, d] (so cameras that failed
    together do not reconnect in lockstep); `reset()` after a success."""

    def __init__(self, base_s: float = 0.5, cap_s: float = 30.0, rng: random.Random | None = None) -> None:
        if base_s <= 0 or cap_s < base_s:
            raise ValueError(f"backoff needs 0 < base ({base_s}) <= cap ({cap_s})")
        self.base_s = base_s
        self.cap_s = cap_s
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """The wait after one more failure."""
        d = min(self.cap_s, self.base_s * (2.0 ** min(self.failures, 30)))
        self.failures += 1
        return self._rng.uniform(d / 2, d)

    def reset(self) -> None:
        """Forget past failures (call once frames flow again)."""
        self.failures = 0
