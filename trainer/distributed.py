"""Processes and devices: parse --device, start one process per GPU with torch's elastic launcher, rank helpers.

Started plainly with several devices, training re-launches itself through
`torch.distributed.launcher.api.elastic_launch` (what `torchrun` runs): one process per GPU,
NCCL on CUDA, gloo on CPU. Started under `torchrun` (any number of nodes) it joins that group.
Every collective has a timeout, so a dead rank ends the run with an error instead of a hang. Under torchrun
(a first attempt, its agent serving the store), a rank that cannot start (its node's dataset or last.pt missing)
posts its error in the launcher's store before exiting, and every rank reads those posts before joining: the others
stop with that line at once.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .lockstep import all_reduce_sum
from .torchrun_env import launched_rank, under_launcher

__all__ = ["EPOCH_END_WAIT_S", "CrossRankBatchNorm", "DistContext", "all_reduce_tensors", "barrier", "broadcast_module",
           "convert_sync_batchnorm", "epoch_end_group", "init_process", "launch", "launched_rank", "parse_devices",
           "report_start_failure", "under_launcher"]


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
        raise ValueError(f"device {','.join(missing)} requested but {seen}; use --device cpu (device='cpu' from "
                         "Python) or a visible GPU")
    return ids


_joined = False  # this process reached the process group (a failure after that is seen by the others' collectives)


def _start_store(timeout_s: float) -> Any:
    """The launcher's key-value store (torchrun's agent on the rendezvous host: MASTER_ADDR, MASTER_PORT), under
    keys of this launch attempt only; None when not launched with several processes, when the agent serves no store
    there (TORCHELASTIC_USE_AGENT_STORE not True: rank 0's own init_process_group opens it), or on a restart: each
    node's agent counts its own restarts (one restarted for a newcomer keeps its count), so the keys of a restarted
    attempt would differ between nodes, or be those of an earlier attempt."""
    if not (under_launcher() and int(os.environ["WORLD_SIZE"]) > 1 and "MASTER_ADDR" in os.environ
            and "MASTER_PORT" in os.environ and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"yolov12-train/start/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/0/", store)


def report_start_failure(message: str) -> None:
    """Under torchrun, before this process joined the group: post why it cannot start, so that every other rank
    stops with this line at once (`init_process`) instead of waiting --dist-timeout for it. Best effort, never
    raises; a no-op once joined or when not launched."""
    if _joined:
        return
    with contextlib.suppress(Exception):
        store = _start_store(10.0)
        if store is not None:  # the first failure posted is the one every rank reports
            store.compare_set("failed", "", f"{os.environ['RANK']}\n{socket.gethostname()}\n{message}")


def _agree_to_start(timeout_s: float) -> None:
    """Count this rank ready and wait until every rank is; a failure a rank posted (or a rank missing after
    `timeout_s`) is one RuntimeError line here, on every rank, before anyone waits in the group."""
    try:
        store = _start_store(timeout_s)
        if store is None:
            return
        world = int(os.environ["WORLD_SIZE"])
        ready, deadline = store.add("ready", 1), time.monotonic() + timeout_s
        while True:
            if store.check(["failed"]):
                rank, host, failure = store.get("failed").decode().split("\n", 2)
                raise RuntimeError(f"rank {rank} (host {host}) could not start: {failure}")
            if ready >= world:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{world - ready} of {world} processes did not start within --dist-timeout "
                                   f"{timeout_s:g} s: see the log of every node")
            time.sleep(0.25)
            ready = store.add("ready", 0)
    except dist.DistError as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        raise RuntimeError(f"lost torchrun's store while waiting for every rank to start (its node's launcher "
                           f"ended?): {reason}") from None


def init_process(devices: list[str], timeout_s: float) -> DistContext:
    """Join the process group when launched (or return a single-process context) and pick this rank's device.
    Under torchrun every rank first waits for all the others to be ready to join (`_agree_to_start`)."""
    global _joined
    if not under_launcher():
        dev = torch.device("cpu") if devices == ["cpu"] else torch.device(f"cuda:{devices[0]}")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistContext(device=dev)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if devices == ["cpu"]:
        dev, backend = torch.device("cpu"), "gloo"
        # the machine's cores split between this machine's ranks: more threads than cores makes every
        # OpenMP barrier wait for a descheduled thread (a step several times slower)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(local_world, 1)))
    else:
        dev, backend = torch.device(f"cuda:{devices[local % len(devices)]}"), "nccl"
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        _agree_to_start(timeout_s)
        _joined = True
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if backend == "nccl" else None)
    return DistContext(rank, world, local, dev)


# How long the other ranks wait at an epoch's end while the main process validates and saves (the whole val split
# on one process): a wait bounded by --dist-timeout ended long validations with a timeout blamed on a waiting rank.
# A rank that dies meanwhile is still noticed at once: the launcher (ours or torchrun) ends the job.
EPOCH_END_WAIT_S = 24 * 3600.0


def epoch_end_group(ctx: DistContext, timeout_s: float) -> Any:
    """All ranks again, on the job's backend, with collectives that wait up to max(`timeout_s`, EPOCH_END_WAIT_S)
    (None alone); every rank calls it at the same point (group creation is collective)."""
    if not ctx.distributed:
        return None
    return dist.new_group(timeout=datetime.timedelta(seconds=max(timeout_s, EPOCH_END_WAIT_S)))


def barrier(ctx: DistContext, group: Any = None) -> None:
    """Wait for every rank (no-op alone), on `group` if given (e.g. `epoch_end_group`'s patient one)."""
    if ctx.distributed:
        if ctx.device.type == "cuda":
            dist.barrier(group=group, device_ids=[ctx.device.index])
        else:
            dist.barrier(group=group)


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
    # The launcher logs a failed rank's traceback, and each rank it stops, line by line (some 25 lines, prefixed
    # "E1207 ... api.py:836]") before the one line below says the same: kept to what goes wrong in the launcher.
    quiet = {"torch.distributed.elastic": logging.CRITICAL, "torch.multiprocessing.spawn": logging.ERROR}
    saved = {name: logging.getLogger(name).level for name in quiet}
    for name, level in quiet.items():
        logging.getLogger(name).setLevel(level)
    try:
        results = elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", message)
        raise RuntimeError(f"training process rank {rank} failed: {message}") from None
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
    return results[0]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable (the gradient of a sum is the sum of the ranks' gradients); both
    directions go through the step's ledger, so a rank that fails mid-step can still enter them."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(grad.clone())


class CrossRankBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose batch statistics span every rank (what SyncBatchNorm does), on CPUs and GPUs.

    Each rank reduces its own batch to per-channel sums, sums of squared deviations from its own mean and
    count-weighted squared means (float64 on CPU, float32 on GPU); one differentiable all-reduce combines
    them into the union's mean and variance (the parallel-variance formula, as SyncBatchNorm's gather does),
    so forward and backward equal BatchNorm over the union of the ranks' batches, with one collective each
    way. torch's SyncBatchNorm is not used even on GPUs: its collectives cannot be counted, and a rank that
    runs out of memory mid-forward must enter the ones it missed (see `trainer.lockstep`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c, shape = x.shape[1], (1, x.shape[1], 1, 1)
        xs = x.to(torch.float64 if x.device.type == "cpu" else torch.float32)
        n_local = x.numel() / c
        local_sum = xs.sum((0, 2, 3))
        local_m2 = (xs - (local_sum / n_local).view(shape)).pow(2).sum((0, 2, 3))
        count = torch.full((1,), n_local, dtype=xs.dtype, device=x.device)
        total = _AllReduceSum.apply(torch.cat([local_sum, local_m2, local_sum.pow(2) / n_local, count]))
        s, m2, q, n = total[:c], total[c:2 * c], total[2 * c:3 * c], total[-1]
        mean = s / n
        var = (m2 + q - s.pow(2) / n).clamp(min=0) / n
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
            unbiased = var.detach() * n / (n - 1).clamp(min=1)
            self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        y = (xs - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape).to(y.dtype) + self.bias.view(shape).to(y.dtype)
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every plain BatchNorm2d becomes a CrossRankBatchNorm with the same weights and statistics (in place)."""
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = CrossRankBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                      child.track_running_stats).to(next(child.buffers()).device)
            sync.load_state_dict(child.state_dict())
            setattr(model, name, sync)
        else:
            convert_sync_batchnorm(child)
    return model


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Give every rank `src`'s parameters and buffers (the start of training, as DDP's constructor does)."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src)


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> Iterator[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (size + t.numel() * t.element_size() > bucket_bytes or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket


def all_reduce_tensors(tensors: list[torch.Tensor], average: bool = False, bucket_bytes: int = 25 << 20) -> None:
    """Sum (or average) tensors over ranks in place, flattened into buckets of about `bucket_bytes`.

    Every rank must pass the same list (same shapes and dtypes, same order).
    """
    world = dist.get_world_size()
    for bucket in _buckets(tensors, bucket_bytes):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat)
        if average:
            flat /= world
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
