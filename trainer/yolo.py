"""`YOLO`: the user-facing handle on a model (build, load, train, validate, export), as ultralytics users expect."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, load_checkpoint
from .nn import DetectionModel, build_model

__all__ = ["YOLO"]


class YOLO:
    """`YOLO("yolov12s.yaml")` builds a fresh model; `YOLO("best.pt")` loads ours, official or ultralytics weights.

    `.model` is the `nn.Module`; its eval-mode forward on float [B,3,H,W] in 0..1 returns [B, 4+nc, N].
    """

    def __init__(self, model: str | Path | DetectionModel = "yolov12n.yaml", nc: int | None = None,
                 names: dict[int, str] | list[str] | None = None) -> None:
        self.ckpt: Checkpoint | None = None
        self.cfg_yaml: str | None = None  # set while `.model` is a fresh build of a yaml: training rebuilds it seeded
        self.source = str(model) if not isinstance(model, DetectionModel) else "<module>"
        if isinstance(model, DetectionModel):
            self.model = model
        elif str(model).endswith((".yaml", ".yml")):
            self.model = build_model(model, nc=nc, names=names)
            self.cfg_yaml = str(model)
        elif str(model).endswith((".pt", ".pth")):
            self.ckpt = load_checkpoint(model)
            self.model = self.ckpt.model
        else:
            raise ValueError(f"'{model}': expected a model yaml (yolov12n.yaml ... yolov12x-v1.yaml) "
                             "or a .pt checkpoint")

    @property
    def names(self) -> dict[int, str]:
        return self.model.names

    def info(self, imgsz: int = 640, verbose: bool = True) -> dict[str, Any]:
        """Layers, parameters and GFLOPs at `imgsz`; printed as one summary line when `verbose`."""
        info = self.model.info(imgsz)
        if verbose:
            print(f"YOLOv12-{info['scale'] or '?'} ({info['variant']}): {info['layers']} layers, "
                  f"{info['parameters']:,} parameters, {info['gflops']:.1f} GFLOPs at {imgsz}, {info['nc']} classes")
        return info

    def train(self, **kwargs: Any) -> dict[str, Any]:
        """Train on `data=...yaml` (see `trainer.config.TrainConfig` for every option); returns final metrics."""
        from .engine import train

        return train(self, **kwargs)

    def val(self, **kwargs: Any) -> dict[str, Any]:
        """Validate on `data=...yaml`; returns a dict with at least 'mAP50-95' and 'mAP50'."""
        from .validate import val

        return val(self, **kwargs)

    def export(self, format: str = "onnx", **kwargs: Any) -> str:
        """Export to `format` ('onnx' or 'engine'); returns the written path."""
        from .export import export

        return str(export(self, format=format, **kwargs))
