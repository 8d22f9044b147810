"""Training data: data.yaml, label checks, the augmenting dataset, the loader, and the synthetic defect generator.

    from trainer.data import load_data_config, DetectionDataset, build_dataloader
    cfg = load_data_config("defects.yaml")
    ds = DetectionDataset(cfg, "train", imgsz=640, augment=True, hyp=default_hyp("s"), batch_size=16)
    loader = build_dataloader(ds, batch_size=16, workers=4, shuffle=True, rank=0, world_size=1, seed=0)

Names are imported lazily: `trainer.data.synth` (the scene renderer the server's demo cameras use) must
import without torch or OpenCV.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "config", "DataError": "config", "load_data_config": "config", "label_path_for": "config",
    "ImageRecord": "labels", "LabelReport": "labels", "scan_split": "labels",
    "default_hyp": "augment", "scale_defaults": "augment",
    "DetectionDataset": "dataset", "collate": "dataset",
    "build_dataloader": "loader",
    "render_scene": "synth", "synthesize": "synth", "synth_main": "synth", "CLASS_NAMES": "synth",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'trainer.data' has no attribute {name!r}")
