"""Which devices to run on: `--gpus` parsing, GPU discovery and telemetry through NVML (no torch, no CUDA init).

NVML comes from the optional `nvidia-ml-py` package (extra `gpu`); without it, `nvidia-smi -L` is used
for discovery and telemetry is simply absent.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["GpuSample", "GpuTelemetry", "engine_device", "parse_gpus", "split_cpu_threads", "visible_gpus"]


def _nvml():
    """The initialised pynvml module, or None when NVML is unavailable."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


def _physical_gpu_count() -> int:
    nvml = _nvml()
    if nvml is not None:
        try:
            return int(nvml.nvmlDeviceGetCount())
        except Exception:
            pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return len(re.findall(r"^GPU \d+:", out, flags=re.M))


def visible_gpus() -> list[int]:
    """Indices of the GPUs this process may use (CUDA_VISIBLE_DEVICES respected), found without torch."""
    n = _physical_gpu_count()
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        listed = [x for x in env.split(",") if x.strip() and x.strip() != "-1"]
        n = min(n, len(listed))
    return list(range(n))


def _physical_index(i: int) -> int:
    """NVML numbers GPUs physically; CUDA renumbers them after CUDA_VISIBLE_DEVICES."""
    listed = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    return int(listed[i]) if i < len(listed) and listed[i].isdigit() else i


def parse_gpus(spec: str | None, visible: list[int] | None = None) -> list[str]:
    """`--gpus` -> device names: None = all visible GPUs else ['cpu']; 'cpu'; 'cpu:N' (N CPU devices 'cpu:0' ..
    sharing the cores: a device each can fail, be drained and take streams on its own, as GPUs do); '0-3'; '0,2'.
    One clear error."""
    visible = visible_gpus() if visible is None else visible
    if spec is None or spec.strip() == "":
        return [f"cuda:{i}" for i in visible] or ["cpu"]
    spec = spec.strip().lower()
    if spec == "cpu":
        return ["cpu"]
    if spec.startswith("cpu"):
        m = re.fullmatch(r"cpu:(\d+)", spec)
        if not m or not 1 <= int(m.group(1)) <= 64:
            raise ConfigError(f"--gpus {spec!r}: CPU devices are 'cpu' or 'cpu:N' with N in 1..64 (N devices "
                              "sharing the cores)")
        return [f"cpu:{i}" for i in range(int(m.group(1)))]
    wanted: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ConfigError(f"--gpus {spec!r}: expected 'cpu', an index list such as '0,2' or a range such as '0-3'")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ConfigError(f"--gpus {spec!r}: range {part} runs backwards")
        wanted += [i for i in range(lo, hi + 1) if i not in wanted]
    missing = [i for i in wanted if i not in visible]
    if missing:
        seen = ",".join(map(str, visible)) if visible else "none"
        raise ConfigError(f"--gpus {spec}: GPU {','.join(map(str, missing))} not present (visible GPUs: {seen}); "
                          "use --gpus cpu or a visible index")
    return [f"cuda:{i}" for i in wanted]


def engine_device(device: str) -> str:
    """The device an engine backend is opened on for a server device: 'cpu:1' (one of `--gpus cpu:N`) -> 'cpu'."""
    return "cpu" if device.startswith("cpu") else device


def split_cpu_threads(devices: list[str], instances: int, cores: int | None = None) -> int | None:
    """Intra-op threads per engine instance when several CPU devices share the cores (cores / (devices x
    instances), at least 1; `cores`: those this process may use); None for one CPU device (the backend's own
    default: cores / instances)."""
    cpus = sum(d.startswith("cpu") for d in devices)
    if cpus <= 1:
        return None
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
    return max(1, cores // (cpus * max(1, instances)))


@dataclass(frozen=True)
class GpuSample:
    """One reading of a GPU: utilisation 0..1 and memory in bytes."""

    device: str
    utilization: float
    memory_used_bytes: int
    memory_total_bytes: int


class GpuTelemetry:
    """Reads utilisation and memory of the `cuda:N` devices through NVML; empty when NVML is absent."""

    def __init__(self, devices: list[str]) -> None:
        self._nvml = _nvml() if any(d.startswith("cuda") for d in devices) else None
        self._handles = {}
        if self._nvml is not None:
            for d in devices:
                if d.startswith("cuda:"):
                    try:
                        index = _physical_index(int(d.split(":")[1]))
                        self._handles[d] = self._nvml.nvmlDeviceGetHandleByIndex(index)
                    except Exception:
                        pass

    def sample(self) -> list[GpuSample]:
        """Current readings (one per GPU that answered)."""
        out = []
        for d, h in self._handles.items():
            try:
                util = self._nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0
                mem = self._nvml.nvmlDeviceGetMemoryInfo(h)
                out.append(GpuSample(d, util, int(mem.used), int(mem.total)))
            except Exception:
                continue
        return out
