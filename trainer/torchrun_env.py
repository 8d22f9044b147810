"""What torchrun (or elastic_launch) told this process through its environment, read without importing torch:
the console script asks before torch is loaded, the trainer after."""

from __future__ import annotations

import os

__all__ = ["launched_rank", "under_launcher"]


def under_launcher() -> bool:
    """True when started by torchrun / elastic_launch (the environment carries RANK, WORLD_SIZE and LOCAL_RANK)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def launched_rank() -> int:
    """This process's global rank under torchrun (RANK); 0 when not launched. Known before the group is joined."""
    return int(os.environ["RANK"]) if under_launcher() else 0
