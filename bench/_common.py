"""Shared helpers for the benchmarks: timing side by side, markdown tables, machine description."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
_ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """One line: CPU model, cores, and the GPU when there is one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores"
    try:
        import torch

        if torch.cuda.is_available():
            desc += f", {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return desc


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, measured in alternation so machine noise hits all alike.

    The order rotates every round: in a fixed order each function always follows the same neighbour
    (warm caches and allocator blocks of a same-shaped model, or cold ones), a bias that never averages out.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A markdown table."""
    def fmt(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, text: str) -> Path:
    """Write a benchmark's markdown under bench/results/ and return the path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    path.write_text(text)
    return path


def export_pair(work: Path, imgsz: int) -> tuple[Path, Path]:
    """(ours, theirs): ultralytics' yolo12n at its seed-0 initialisation, exported to ONNX at `imgsz` by our
    exporter and by ultralytics' (cached in `work`): the pair every side-by-side benchmark compares."""
    ours, theirs = work / f"ours-yolov12n-v1-{imgsz}.onnx", work / f"theirs-yolo12n-{imgsz}.onnx"
    if ours.is_file() and theirs.is_file():
        return ours, theirs
    work.mkdir(parents=True, exist_ok=True)
    code = f"""
import os, shutil, tempfile
os.environ.setdefault("YOLO_OFFLINE", "1"); os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp())
import torch
from ultralytics import YOLO
from trainer.nn import build_model
from trainer.export import export
torch.manual_seed(0)
y = YOLO("yolo12n.yaml")
names = dict(y.model.names)
ours = build_model("yolov12n-v1.yaml", nc=len(names), names=names)
ours.load_state_dict(y.model.state_dict())
export(ours, format="onnx", imgsz={imgsz}, batch=16, dynamic=True, output={str(ours)!r})
os.chdir({str(work)!r})
out = y.export(format="onnx", imgsz={imgsz}, dynamic=True, simplify=True)
shutil.move(out, {str(theirs)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=_ROOT, env={**os.environ, "PYTHONPATH": str(_ROOT)})
    return ours, theirs
