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

__all__ = ["YOLO"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "YOLO":
        from .yolo import YOLO

        return YOLO
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
