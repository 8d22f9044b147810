"""Processes and devices: parse --device, start one process per GPU with torch's elastic launcher, rank helpers.

Started plainly with several devices, training re-launches itself through
`torch.distributed.launcher.api.elastic_launch` (what `torchrun` runs): one process per GPU,
NCCL on CUDA, gloo on CPU. Started under `torchrun` (any number of nodes) it joins that group.
Every collective has a timeout, so a dead rank ends the run with an error instead of a hang.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistContext", "barrier", "init_process", "launch", "parse_devices", "under_launcher"]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def parse_devices(device: str) -> list[str]:
    """'' -> ['0'] with CUDA else ['cpu']; '0,1' -> ['0','1']; 'cuda:2' -> ['2']; 'cpu' -> ['cpu'].

    Raises ValueError naming the visible GPUs when a requested one does not exist.
    """
    device = str(device).strip().lower().replace("cuda:", "")
    if device in ("", "auto"):
        return ["0"] if torch.cuda.is_available() else ["cpu"]
    if device == "cpu":
        return ["cpu"]
    ids = [d.strip() for d in device.split(",") if d.strip()]
    if not all(d.isdigit() for d in ids):
        raise ValueError(f"device '{device}': expected cpu, a GPU index (0) or a list (0,1,2,3)")
    count = torch.cuda.device_count()
    missing = [d for d in ids if int(d) >= count]
    if missing:
        seen = f"GPUs 0-{count - 1} are visible" if count else "no GPU is visible (CUDA not available)"
        raise ValueError(f"device {','.join(missing)} requested but {seen}; use --device cpu or a visible GPU")
    return ids


def under_launcher() -> bool:
    """True when started by torchrun / elastic_launch (the environment carries RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init_process(devices: list[str], timeout_s: float) -> DistContext:
    """Join the process group when launched (or return a single-process context) and pick this rank's device."""
    if not under_launcher():
        dev = torch.device("cpu") if devices == ["cpu"] else torch.device(f"cuda:{devices[0]}")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistContext(device=dev)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if devices == ["cpu"]:
        dev, backend = torch.device("cpu"), "gloo"
    else:
        dev, backend = torch.device(f"cuda:{devices[local % len(devices)]}"), "nccl"
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if backend == "nccl" else None)
    return DistContext(rank, world, local, dev)


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op alone)."""
    if ctx.distributed:
        if ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(entrypoint: Callable[..., Any], nproc: int, *args: Any) -> Any:
    """Run `entrypoint(*args)` in `nproc` local processes through torch's elastic launcher; rank 0's result.

    A rank that dies takes the others down; the launcher's ChildFailedError is turned into one
    readable RuntimeError naming the rank and its error.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"yolov12-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0,
                          monitor_interval=0.5, start_method="spawn")
    try:
        results = elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", message)
        raise RuntimeError(f"training process rank {rank} failed: {message}") from None
    return results[0]
