"""Memory policy: mixed precision, micro-batch size and gradient checkpointing, chosen automatically.

On CUDA the largest micro-batch is found by probing: real forward + backward passes at growing
sizes until memory runs out (or a safety fraction of the card is reached). Checkpointing is
switched on when it lets at least twice as many images fit. On CPU nothing is probed: the whole
per-process batch is one micro-batch unless `micro_batch` says otherwise.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["MemoryPlan", "autocast", "choose_precision", "is_oom", "plan_memory", "probe_micro_batch"]


def choose_precision(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 where the GPU supports it, else fp16; None (fp32) on CPU unless asked."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for `dtype`, or a null context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def is_oom(e: BaseException) -> bool:
    """True for CUDA (and CPU allocator) out-of-memory errors."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def _free_cuda(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def probe_micro_batch(step: Callable[[int], None], device: torch.device, upper: int, fraction: float = 0.9) -> int:
    """Largest n <= upper for which `step(n)` (a forward + backward of n images) fits in `fraction` of the GPU.

    Doubles from 1 until OOM or the memory ceiling, then bisects between the last fit and the failure.
    """
    total = torch.cuda.get_device_properties(device).total_memory
    fits, fails, n = 0, upper + 1, 1
    while fits < upper:
        _free_cuda(device)
        try:
            step(n)
            ok = torch.cuda.max_memory_reserved(device) <= fraction * total
        except Exception as e:
            if not is_oom(e):
                raise
            ok = False
        if ok:
            fits = n
        else:
            fails = n
        if fails <= fits + 1:
            break
        n = min(upper, n * 2) if fails == upper + 1 else (fits + fails) // 2
    _free_cuda(device)
    return max(fits, 1)


@dataclass
class MemoryPlan:
    """What the trainer runs with on this device."""

    micro_batch: int
    grad_checkpointing: bool
    dtype: torch.dtype | None

    def describe(self, per_process: int) -> str:
        steps = -(-per_process // self.micro_batch)
        precision = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]
        return (f"micro-batch {self.micro_batch} x {steps} accumulation step(s) per process, "
                f"{precision}, gradient checkpointing {'on' if self.grad_checkpointing else 'off'}")


def plan_memory(per_process: int, device: torch.device, dtype: torch.dtype | None, micro_batch: int,
                checkpointing: str, probe: Callable[[int, bool], None]) -> MemoryPlan:
    """Decide micro-batch and checkpointing. `probe(n, ckpt)` runs one forward + backward of n images."""
    if micro_batch:
        return MemoryPlan(min(micro_batch, per_process), checkpointing == "on", dtype)
    if device.type != "cuda":
        return MemoryPlan(per_process, checkpointing == "on", dtype)
    if checkpointing in ("on", "off"):
        ckpt = checkpointing == "on"
        return MemoryPlan(probe_micro_batch(lambda n: probe(n, ckpt), device, per_process), ckpt, dtype)
    plain = probe_micro_batch(lambda n: probe(n, False), device, per_process)
    if plain >= per_process:
        return MemoryPlan(plain, False, dtype)
    with_ckpt = probe_micro_batch(lambda n: probe(n, True), device, per_process)
    return MemoryPlan(with_ckpt, True, dtype) if with_ckpt >= 2 * plain else MemoryPlan(plain, False, dtype)
