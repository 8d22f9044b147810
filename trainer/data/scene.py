"""One synthetic inspection frame: a textured part on a conveyor belt, with defects and exact boxes.

`render_scene(rng, hw)` is all most callers need (the server's demo cameras, the dataset generator).
It is `draw_scene(plan_scene(rng, hw))`: every random choice is made first into a `ScenePlan`, so the
same frame can be drawn again without its defects (`draw_scene(plan, defects=False)`): the tests use
that to check each box touches what was drawn. numpy + PIL only: no OpenCV, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from .defects import CLASS_NAMES, PAINTERS, patch_shape
from .surfaces import SURFACES, belt, sensor_noise

__all__ = ["CLASS_NAMES", "DefectPlan", "ScenePlan", "draw_scene", "plan_scene", "render_scene"]

MAX_DEFECTS = 6
MIN_DEFECT_PX = 8
VISIBLE_DELTA = 4.0  # a painted pixel counts towards its box when it changed by more than this (0..255 scale)


@dataclass(frozen=True)
class DefectPlan:
    """A defect of class `cls` drawn inside the patch at (x, y) of size (h, w), with its own seed."""

    cls: int
    x: int
    y: int
    h: int
    w: int
    seed: int


@dataclass(frozen=True)
class ScenePlan:
    """Every random choice of one frame: surface, part placement, defects, lighting and camera noise."""

    hw: tuple[int, int]
    surface: str
    panel: tuple[int, int, int, int]  # x0, y0, x1, y1 of the part on the belt
    defects: tuple[DefectPlan, ...]
    light: tuple[float, float, float, float]  # gain, x slope, y slope, vignette
    tint: tuple[float, float, float]
    noise_sigma: float
    blur_radius: float
    seed: int


def plan_scene(rng: np.random.Generator, hw: tuple[int, int]) -> ScenePlan:
    """Choose everything about a frame of size (h, w); draws nothing."""
    h, w = int(hw[0]), int(hw[1])
    if h < 32 or w < 32:
        raise ValueError(f"frame size {h}x{w} is too small; use at least 32x32")
    surface = ("metal", "fabric", "board")[rng.integers(3)]
    if rng.random() < 0.3:
        panel = (0, 0, w, h)
    else:
        mx, my = rng.uniform(0, 0.12, 2) * (w, h)
        mx2, my2 = rng.uniform(0, 0.12, 2) * (w, h)
        panel = (int(mx), int(my), w - int(mx2), h - int(my2))
    n = 0 if rng.random() < 0.05 else int(rng.integers(1, MAX_DEFECTS + 1))
    defects = _place_defects(rng, panel, n)
    gain, gx, gy, vignette = (float(v) for v in rng.uniform((0.7, -0.35, -0.35, 0.0), (1.25, 0.35, 0.35, 0.35)))
    r, g, b = (float(t) for t in 1 + rng.uniform(-0.06, 0.06, 3))
    blur = float(rng.uniform(0.3, 0.7)) if rng.random() < 0.35 else 0.0
    return ScenePlan((h, w), surface, panel, defects, (gain, gx, gy, vignette), (r, g, b),
                     float(rng.uniform(1.0, 6.0)), blur, int(rng.integers(2**31)))


def _place_defects(rng: np.random.Generator, panel: tuple[int, int, int, int], n: int) -> tuple[DefectPlan, ...]:
    """Up to `n` defects of random classes and sizes (some small) in non-overlapping patches inside the panel."""
    x0, y0, x1, y1 = panel
    pw, ph = x1 - x0, y1 - y0
    side = min(pw, ph)
    placed: list[DefectPlan] = []
    for _ in range(n):
        cls = int(rng.integers(len(CLASS_NAMES)))
        size = max(MIN_DEFECT_PX, side * float(np.exp(rng.uniform(np.log(0.05), np.log(0.35)))))
        h, w = patch_shape(cls, size, rng)
        h, w = min(h, ph - 2), min(w, pw - 2)
        for _ in range(30):
            x = int(rng.integers(x0 + 1, x1 - w))
            y = int(rng.integers(y0 + 1, y1 - h))
            gap = 3  # keep patches apart so one defect's box never holds another's pixels
            if all(x + w + gap <= d.x or d.x + d.w + gap <= x or y + h + gap <= d.y or d.y + d.h + gap <= y
                   for d in placed):
                placed.append(DefectPlan(cls, x, y, h, w, int(rng.integers(2**31))))
                break
    return tuple(placed)


def draw_scene(plan: ScenePlan, defects: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw a planned frame: (image uint8 (h, w, 3) RGB, boxes float32 [n, 4] xyxy pixels, classes int64 [n]).

    With `defects=False` the same frame is drawn without its defects (the boxes are still returned).
    """
    h, w = plan.hw
    rng = np.random.default_rng(plan.seed)
    frame = belt(rng, h, w)
    x0, y0, x1, y1 = plan.panel
    frame[y0:y1, x0:x1] = SURFACES[plan.surface](rng, y1 - y0, x1 - x0)
    scale = max(1.0, min(h, w) / 320)
    boxes, classes = [], []
    for d in plan.defects:
        region = frame[d.y:d.y + d.h, d.x:d.x + d.w]
        before = region.copy()
        target = region if defects else region.copy()
        touched = PAINTERS[d.cls](np.random.default_rng(d.seed), target, plan.surface, scale)
        visible = touched & (np.abs(target - before).max(-1) > VISIBLE_DELTA)  # the box bounds what shows
        rows, cols = np.flatnonzero(visible.any(1)), np.flatnonzero(visible.any(0))
        if len(rows) == 0:
            continue
        boxes.append((d.x + cols[0], d.y + rows[0], d.x + cols[-1] + 1, d.y + rows[-1] + 1))
        classes.append(d.cls)
    column_gain, row_gain = _lighting(plan)
    frame *= column_gain[:, None, None]
    frame *= row_gain[None]
    frame += sensor_noise(rng, h, w) * plan.noise_sigma
    image = np.clip(frame, 0, 255, out=frame).astype(np.uint8)
    if plan.blur_radius:
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.BoxBlur(plan.blur_radius)))
    return image, np.array(boxes, np.float32).reshape(-1, 4), np.array(classes, np.int64)


def _lighting(plan: ScenePlan) -> tuple[np.ndarray, np.ndarray]:
    """Uneven lighting as separable gains, cheap to apply: per row (h,) and per column and channel (w, 3).

    Their product is an overall gain, a linear gradient in x and y, a vignette and a colour tint.
    """
    h, w = plan.hw
    gain, gx, gy, vignette = plan.light
    yy = np.arange(h, dtype=np.float32) / h - 0.5
    xx = np.arange(w, dtype=np.float32) / w - 0.5
    column = gain * (1 + gy * yy) * (1 - vignette * yy * yy)
    row = (1 + gx * xx) * (1 - vignette * xx * xx)
    return column.astype(np.float32), np.outer(row, np.array(plan.tint, np.float32))


def render_scene(rng: np.random.Generator, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A conveyor frame of size hw=(h, w) with defects: (image uint8 HxWx3 RGB, boxes [n,4] xyxy px, classes [n])."""
    return draw_scene(plan_scene(rng, hw))
