"""YOLOv12 trainer: the model, data, distributed training, validation and export.

    from trainer import YOLO
    YOLO("yolov12s.yaml").train(data="defects.yaml", batch=256, device="0,1,2,3")
"""

from .yolo import YOLO

__all__ = ["YOLO"]
__version__ = "0.1.0"
