"""The YOLOv12 model: building blocks, area attention, detection head and the yaml builder."""

from .attention import A2C2f, AAttn, AAttnV1, ABlock, attention, attention_backend
from .blocks import Bottleneck, C3k, C3k2
from .builder import MODEL_CONFIGS, build_model, load_model_yaml, resolve_model_yaml
from .conv import Conv, DWConv
from .head import DFL, Detect
from .model import Concat, DetectionModel, ModelSpec

__all__ = [
    "DFL", "MODEL_CONFIGS", "A2C2f", "AAttn", "AAttnV1", "ABlock", "Bottleneck", "C3k", "C3k2", "Concat", "Conv",
    "DWConv", "Detect", "DetectionModel", "ModelSpec", "attention", "attention_backend", "build_model",
    "load_model_yaml", "resolve_model_yaml",
]
