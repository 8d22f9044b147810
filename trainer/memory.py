"""Memory policy: mixed precision, micro-batch size and gradient checkpointing, chosen automatically.

The largest micro-batch is found by probing: real forward + backward passes at growing sizes until
memory runs out or the budget is reached. On CUDA the budget is 90% of the card (or `memory_budget`)
and the peak is the caching allocator's; on a CPU nothing is probed unless a `memory_budget` in bytes
is given, and then the peak is the process's own resident-set high-water mark (Linux resets it on
request), so the probing path runs, and is tested, without a GPU. Checkpointing is switched on when
it lets at least twice as many images fit. Ranks agree on the plan afterwards (see the trainer).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import parse_bytes

__all__ = ["MemoryPlan", "autocast", "choose_precision", "is_oom", "memory_meter", "parse_bytes", "plan_memory",
           "probe_micro_batch"]

CUDA_FRACTION = 0.9  # of the card, when no budget is given: room for the allocator's fragmentation


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


class CudaMeter:
    """Peak of the CUDA caching allocator on one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def capacity(self) -> int:
        return int(CUDA_FRACTION * torch.cuda.get_device_properties(self.device).total_memory)

    def reset(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_reserved(self.device)


class ProcessMeter:
    """Peak resident set of this process (Linux: VmHWM, reset by writing 5 to /proc/self/clear_refs)."""

    def __init__(self) -> None:
        self._libc = _libc()

    def capacity(self) -> int:
        return 0  # no default budget: a CPU is not probed unless asked

    def reset(self) -> None:
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)  # give freed arenas back, so the next peak is the next step's own
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise OSError("no VmHWM in /proc/self/status: peak memory of a CPU process is only measured on Linux")


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def memory_meter(device: torch.device) -> CudaMeter | ProcessMeter:
    """How this device's peak memory is measured."""
    return CudaMeter(device) if device.type == "cuda" else ProcessMeter()


def probe_micro_batch(step: Callable[[int], None], meter: CudaMeter | ProcessMeter, upper: int, budget: int) -> int:
    """Largest n <= upper for which `step(n)` (a forward + backward of n images) peaks within `budget` bytes.

    Doubles from 1 until out of memory or over the budget, then bisects between the last fit and the failure.
    """
    fits, fails, n = 0, upper + 1, 1
    while fits < upper:
        meter.reset()
        try:
            step(n)
            ok = meter.peak() <= budget
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
    meter.reset()
    return max(fits, 1)


@dataclass
class MemoryPlan:
    """What the trainer runs with on this device."""

    micro_batch: int
    grad_checkpointing: bool
    dtype: torch.dtype | None
    probed: bool = False
    resumed: bool = False  # the micro-batch the resumed run had come down to after out-of-memory errors

    def describe(self, per_process: int) -> str:
        steps = -(-per_process // self.micro_batch)
        precision = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]
        how = (" (probed)" if self.probed else
               " (kept: the resumed run came down to it after out of memory)" if self.resumed else "")
        return (f"micro-batch {self.micro_batch}{how} x {steps} accumulation step(s) per process, "
                f"{precision}, gradient checkpointing {'on' if self.grad_checkpointing else 'off'}")


def plan_memory(per_process: int, device: torch.device, dtype: torch.dtype | None, micro_batch: int,
                checkpointing: str, probe: Callable[[int, bool], None], budget: int = 0) -> MemoryPlan:
    """Decide micro-batch and checkpointing. `probe(n, ckpt)` runs one forward + backward of n images.

    budget: bytes the process may peak at (0 = 90% of the GPU; on a CPU, 0 means no probing).
    """
    if micro_batch:
        return MemoryPlan(min(micro_batch, per_process), checkpointing == "on", dtype)
    meter = memory_meter(device)
    budget = budget or meter.capacity()
    if not budget:
        return MemoryPlan(per_process, checkpointing == "on", dtype)

    def largest(ckpt: bool) -> int:
        return probe_micro_batch(lambda n: probe(n, ckpt), meter, per_process, budget)

    if checkpointing in ("on", "off"):
        ckpt = checkpointing == "on"
        return MemoryPlan(largest(ckpt), ckpt, dtype, probed=True)
    plain = largest(False)
    if plain >= per_process:
        return MemoryPlan(plain, False, dtype, probed=True)
    with_ckpt = largest(True)
    if with_ckpt >= 2 * plain:
        return MemoryPlan(with_ckpt, True, dtype, probed=True)
    return MemoryPlan(plain, False, dtype, probed=True)
