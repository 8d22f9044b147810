"""YOLOv12 trainer: the model, data, distributed training, validation and export.

    from trainer import YOLO
    YOLO("yolov12s.yaml").train(data="defects.yaml", batch=256, device="0,1,2,3")

`YOLO` is imported lazily so that torch-free parts (the synthetic scene renderer the server's
demo cameras use) can be imported without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .yolo import YOLO

__all__ = ["YOLO", "require_torch"]
__version__ = "0.1.0"
TORCH_FIX = "run scripts/setup train in the project (or pip install -e '.[train]')"


def require_torch(what: str) -> None:
    """ModuleNotFoundError with the fix when PyTorch is missing: the serving install (scripts/demo) has none, and
    a bare "No module named 'torch'" from deep inside does not say what to install."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise ModuleNotFoundError(f"{what} needs PyTorch, which this environment lacks: {TORCH_FIX}", name="torch")


def __getattr__(name: str) -> Any:
    if name == "YOLO":
        from .yolo import YOLO

        return YOLO
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
