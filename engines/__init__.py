"""Model artifacts at run time: `load(path, device, instances=K) -> Engine`, for ONNX, TensorRT and .pt files.

Importing this package does not import torch or TensorRT: each backend imports what it needs lazily.

    engine = engines.load("best.onnx", instances=2)      # ONNX Runtime, the CPU default
    dets = engine.infer(batch)                           # uint8 [B,H,W,3] -> B x [n, 6]
    engines.read_info("best.engine")                     # metadata only: no session, no GPU
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import Engine, EngineError, EngineInfo
from .letterbox import Letterbox, fit_shape, plan_letterbox
from .metadata import read_info

__all__ = ["BACKENDS", "OPTIONS", "Engine", "EngineError", "EngineInfo", "Letterbox", "fit_shape", "load",
           "plan_letterbox", "read_info"]

BACKENDS = {".onnx": "onnxruntime", ".engine": "tensorrt", ".plan": "tensorrt", ".pt": "pytorch", ".pth": "pytorch"}
OPTIONS = {"onnxruntime": ("threads", "spinning", "fixed_after"), "tensorrt": ("cuda_graphs",),
           "pytorch": ("max_batch", "conf", "iou", "max_det", "cuda_graphs")}


def load(path: str | Path, device: str = "cpu", instances: int = 1, **opts: Any) -> Engine:
    """Open an engine file on `device` with `instances` concurrent workers; the backend follows the suffix.

    .onnx -> ONNX Runtime (device cpu or cuda:N; opts: threads, spinning, fixed_after); .engine/.plan -> TensorRT
    (device cuda:N; opts: cuda_graphs); .pt -> PyTorch (opts: max_batch, conf, iou, max_det, cuda_graphs).
    Raises EngineError with the fix for a missing, unreadable or unknown file.
    """
    path = Path(path)
    backend = BACKENDS.get(path.suffix.lower())
    if backend is None:
        if path.is_dir():  # a models folder given for its file: its empty suffix read as an unknown format ''
            from .metadata import check_file

            check_file(path)
        raise EngineError(f"'{path}': unknown engine format '{path.suffix}': use .onnx (ONNX Runtime), "
                          ".engine/.plan (TensorRT) or .pt (PyTorch)")
    unknown = sorted(set(opts) - set(OPTIONS[backend]))
    if unknown:
        raise EngineError(f"unknown option(s) {', '.join(unknown)} for the {backend} backend ({path.name}): "
                          f"it takes {', '.join(OPTIONS[backend])}")
    if backend == "pytorch":  # the checkpoint is read once, by the backend (its metadata depends on opts)
        from .metadata import check_file
        from .pytorch import TorchEngine

        check_file(path)
        return TorchEngine(path, device=device, instances=instances, **opts)
    info = read_info(path)  # also the missing / empty / corrupt-file checks, before any heavy import
    if backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(path, device=device, instances=instances, info=info, **opts)
    if backend == "tensorrt":
        from .tensorrt import TensorRTEngine

        return TensorRTEngine(path, device=device, instances=instances, info=info, **opts)
