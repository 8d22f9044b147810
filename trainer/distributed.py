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
from torch import nn

__all__ = ["CPUSyncBatchNorm", "DistContext", "barrier", "convert_sync_batchnorm", "init_process", "launch",
           "parse_devices", "under_launcher"]


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


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: the gradient of a sum is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose batch statistics span every rank, for CPU (gloo) jobs.

    torch's SyncBatchNorm only runs on GPUs. This one all-reduces per-channel sums, then sums of
    squared deviations (float64, two passes) with a differentiable all-reduce, so forward and
    backward equal BatchNorm over the union of the ranks' batches.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        xd = x.double()  # statistics in float64: as close to BatchNorm's own kernel as summation order allows
        n_local = torch.tensor([x.numel() / c], dtype=torch.float64, device=x.device)
        first = _AllReduceSum.apply(torch.cat([xd.sum((0, 2, 3)), n_local]))
        n = first[-1]
        mean = first[:c] / n
        var = _AllReduceSum.apply((xd - mean.view(1, c, 1, 1)).pow(2).sum((0, 2, 3))) / n
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.detach().to(x.dtype), alpha=m)
            self.running_var.mul_(1 - m).add_((var.detach() * n / (n - 1).clamp(min=1)).to(x.dtype), alpha=m)
        shape = (1, c, 1, 1)
        y = ((xd - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)).to(x.dtype)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Cross-rank BatchNorm: torch's SyncBatchNorm on CUDA, CPUSyncBatchNorm on CPU (same weights, same stats)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            sync.load_state_dict(child.state_dict())
            setattr(model, name, sync)
        else:
            convert_sync_batchnorm(child, device)
    return model
