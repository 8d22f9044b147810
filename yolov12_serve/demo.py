"""The embedded default (`yolov12-serve --demo`): the bundled model and four synthetic conveyor cameras.

The model, `assets/demo.onnx`, is yolov12n trained on the synthetic defects by our trainer and exported
by our exporter; `scripts/make_demo_model` regenerates it.
"""

from __future__ import annotations

from pathlib import Path

from .config import StreamSpec
from .errors import ConfigError

__all__ = ["DEMO_MODEL", "demo_model", "demo_streams"]

DEMO_MODEL = Path(__file__).resolve().parent / "assets" / "demo.onnx"


def demo_model() -> str:
    """Path of the bundled demo model, or ConfigError saying how to make it."""
    if not DEMO_MODEL.is_file():
        raise ConfigError(f"the bundled demo model is missing ({DEMO_MODEL}): run scripts/make_demo_model, "
                          "or pass --engines MODEL.onnx")
    return str(DEMO_MODEL)


def demo_streams(cameras: int = 4, fps: float = 15.0, size: tuple[int, int] = (640, 360)) -> list[StreamSpec]:
    """`cameras` synthetic conveyor cameras (w x h at `fps`), each with its own belt, its parts tracked (ids in the
    results, objects counted in the table)."""
    w, h = size
    return [StreamSpec(f"line1-cam{i + 1}", f"synthetic://line1-cam{i + 1}?fps={fps:g}&size={w}x{h}&seed={i + 1}",
                       track=True) for i in range(cameras)]
