"""Collectives inside a training step that every rank enters, even a rank whose step failed.

Cross-rank BatchNorm all-reduces statistics inside every forward and backward. When one rank runs
out of memory halfway through a micro-batch, the others are already waiting in (or will soon enter)
the next of those all-reduces; if the failed rank went straight to the step's end, the ranks would
pair up different collectives: a hang, or sums of unrelated tensors. So every such collective goes
through a `StepLedger`, which counts them. The sequence of one micro-batch (forward, backward, and the
recomputation of gradient checkpointing) depends only on the model, never on the images, so it is
recorded once at start-up by one local forward and backward. A rank that fails then enters the rest of
the step's collectives with zeros (neutral in a sum) and the step ends on every rank at the same
collective: the all-reduce of the failure flag, after which all ranks discard the step together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

__all__ = ["StepLedger", "active_ledger", "all_reduce_sum"]

Signature = tuple[tuple[int, ...], torch.dtype]

_active: StepLedger | None = None


class StepLedger:
    """Counts the in-step collectives of this rank, records one micro-batch's sequence, replays it when failed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.trace: list[Signature] | None = None  # one micro-batch's collectives, in order
        self.position = 0  # collectives entered in the current micro-batch
        self._recording: list[Signature] | None = None

    # ------------------------------------------------------------------ used by the collectives
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks in place; while recording, only note its shape (one rank's sum is itself)."""
        if self._recording is not None:
            self._recording.append((tuple(t.shape), t.dtype))
            return t
        dist.all_reduce(t)
        self.position += 1
        return t

    # ------------------------------------------------------------------ used by the trainer
    def record(self, micro_step: Callable[[], None]) -> list[Signature]:
        """Run one micro-batch locally (no communication) and keep its sequence of collectives."""
        with self.local() as seen:
            micro_step()
        self.trace = seen
        return seen

    @contextlib.contextmanager
    def local(self) -> Iterator[list[Signature]]:
        """While the block runs, collectives are not sent: each rank's sum is its own (the memory probe, the
        recording). Yields the list of collectives that would have been entered."""
        previous, self._recording = self._recording, []
        try:
            with self.active():
                yield self._recording
        finally:
            self._recording = previous

    def begin_micro_step(self) -> None:
        self.position = 0

    def enter_rest(self, micro_steps_after: int) -> int:
        """After a failure: enter, with zeros, the rest of this micro-batch's collectives and all of the
        `micro_steps_after` micro-batches the other ranks still run. Returns how many were entered."""
        if not self.trace:
            return 0
        pending = self.trace[self.position:] + self.trace * micro_steps_after
        for shape, dtype in pending:
            dist.all_reduce(torch.zeros(shape, dtype=dtype, device=self.device))
        self.position = len(self.trace)
        return len(pending)

    @contextlib.contextmanager
    def active(self) -> Iterator[StepLedger]:
        """Route `all_reduce_sum` through this ledger while the block runs."""
        global _active
        previous, _active = _active, self
        try:
            yield self
        finally:
            _active = previous


def active_ledger() -> StepLedger | None:
    """The ledger in charge of in-step collectives now, if any."""
    return _active


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place, counted by the active ledger (a plain all-reduce outside a step)."""
    if _active is not None:
        return _active.all_reduce(t)
    dist.all_reduce(t)
    return t
