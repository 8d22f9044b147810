"""Model artifacts at run time: `load(path, device, instances=K) -> Engine`, for ONNX, TensorRT and .pt files.

Importing this package does not import torch or TensorRT: each backend imports what it needs lazily.
"""

from .base import Engine, EngineError, EngineInfo
from .letterbox import Letterbox, fit_shape, plan_letterbox

__all__ = ["Engine", "EngineError", "EngineInfo", "Letterbox", "fit_shape", "plan_letterbox"]
