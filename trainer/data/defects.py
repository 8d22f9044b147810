"""The five synthetic defect classes, each drawn into a patch of a float32 RGB frame (numpy + PIL only).

Every painter changes `region` (an (h, w, 3) view of the frame) in place and returns the boolean mask of
the pixels it drew on; the scene's label is the bounding box of those that visibly changed. Classes look different
on purpose (learnable in a few epochs): a scratch is a thin bright line with a shadow, a crack a dark
jagged branching line, a dent a shaded crater with a dark rim, a stain a coloured irregular blob, a
missing part a dark hole with a bright rim (or, on a board, an empty footprint).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from .surfaces import draw_passive, smooth_noise

__all__ = ["CLASS_NAMES", "PAINTERS", "patch_shape"]

CLASS_NAMES = ("scratch", "dent", "crack", "stain", "missing_part")
STAIN_COLOURS = ((125, 62, 22), (45, 38, 30), (200, 170, 60), (150, 30, 35), (235, 235, 225))

Painter = Callable[[np.random.Generator, np.ndarray, str, float], np.ndarray]


def patch_shape(cls: int, size: float, rng: np.random.Generator) -> tuple[int, int]:
    """The (h, w) of the patch a defect of class `cls` and nominal `size` (pixels) is drawn in."""
    if cls in (0, 2):  # scratch, crack: long and thin, or diagonal
        long = size * 1.4
        short = long * rng.uniform(0.06, 0.3) if cls == 0 else long * rng.uniform(0.15, 0.5)
        if rng.random() < 0.3:
            short = long * rng.uniform(0.5, 1.0)  # a diagonal line across the patch
        h, w = (short, long) if rng.random() < 0.5 else (long, short)
    elif cls == 4:  # missing part: a round hole, or a footprint twice as long as wide
        h = w = size * 0.6
    else:
        aspect = rng.uniform(0.6, 1.6)
        h, w = size * aspect**0.5, size / aspect**0.5
    return max(6, round(h)), max(6, round(w))


def _line_mask(h: int, w: int, points: list[tuple[float, float]], width: int) -> np.ndarray:
    m = Image.new("L", (w, h), 0)
    ImageDraw.Draw(m).line(points, fill=255, width=width, joint="curve")
    return np.asarray(m) > 0


def _blend(region: np.ndarray, mask: np.ndarray, colour: np.ndarray, alpha: float | np.ndarray) -> None:
    a = (mask * alpha).astype(np.float32)[..., None]
    region *= 1 - a
    region += a * colour


def _axis_points(rng: np.random.Generator, h: int, w: int, n: int, wander: float) -> list[tuple[float, float]]:
    """Points from one end of the patch to the other along its long axis (or its diagonal when square-ish)."""
    t = np.linspace(0, 1, n)
    if w >= 2 * h or h >= 2 * w:
        along, across = (w - 1, h - 1) if w >= h else (h - 1, w - 1)
        start, end = rng.uniform(0.2, 0.8, 2) * across
        offs = start + (end - start) * t + rng.uniform(-wander, wander, n) * across
        offs = np.clip(offs, 0, across)
        pos = t * along
        pts = np.stack([pos, offs], 1) if w >= h else np.stack([offs, pos], 1)
    else:  # diagonal, corner to corner
        x = t * (w - 1)
        y = t * (h - 1) + rng.uniform(-wander, wander, n) * (h - 1)
        if rng.random() < 0.5:
            y = (h - 1) - y
        pts = np.stack([x, np.clip(y, 0, h - 1)], 1)
    return [(float(a), float(b)) for a, b in pts]


def scratch(rng: np.random.Generator, region: np.ndarray, surface: str, s: float) -> np.ndarray:
    """A thin bright gouge with a faint dark shadow along one side."""
    h, w = region.shape[:2]
    pts = _axis_points(rng, h, w, int(rng.integers(3, 6)), 0.08)
    width = max(1, round(rng.uniform(1.0, 2.2) * s))
    core = _line_mask(h, w, pts, width)
    shadow = _line_mask(h, w, [(x + 1, y + 1) for x, y in pts], width) & ~core
    _blend(region, shadow, np.float32(20), 0.45)
    _blend(region, core, np.float32(rng.uniform(235, 255)), 0.9)
    return core | shadow


def crack(rng: np.random.Generator, region: np.ndarray, surface: str, s: float) -> np.ndarray:
    """A jagged line with one or two short branches: dark, or light on a dark surface."""
    h, w = region.shape[:2]
    pts = _axis_points(rng, h, w, int(rng.integers(6, 11)), 0.25)
    width = max(1, round(rng.uniform(1.0, 2.0) * s))
    mask = _line_mask(h, w, pts, width)
    for _ in range(int(rng.integers(1, 3))):
        i = int(rng.integers(1, len(pts) - 1))
        x, y = pts[i]
        branch = [(x, y)]
        for _ in range(3):
            x = float(np.clip(x + rng.uniform(-0.25, 0.25) * w, 0, w - 1))
            y = float(np.clip(y + rng.uniform(-0.25, 0.25) * h, 0, h - 1))
            branch.append((x, y))
        mask |= _line_mask(h, w, branch, max(1, width - 1))
    dark_surface = region.mean() < 90  # a crack shows light against a dark surface, dark against a light one
    _blend(region, mask, np.float32(rng.uniform(150, 185) if dark_surface else rng.uniform(12, 35)), 0.92)
    return mask


def dent(rng: np.random.Generator, region: np.ndarray, surface: str, s: float) -> np.ndarray:
    """An elliptical crater: lit on one side, shaded on the other, with a dark rim."""
    h, w = region.shape[:2]
    v = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h * 2 - 1
    u = (np.arange(w, dtype=np.float32)[None, :] + 0.5) / w * 2 - 1
    r2 = u * u + v * v
    inside = r2 < 1
    angle = rng.uniform(0, 2 * np.pi)
    k = rng.uniform(0.45, 0.7)
    gain = 1 + k * (u * np.cos(angle) + v * np.sin(angle)) - 0.2 * (1 - r2)
    rim = inside & (r2 > (1 - max(2.0, 1.5 * s) / (0.5 * min(h, w))) ** 2)
    gain = np.where(rim, 0.55, gain)
    region *= np.where(inside, gain, 1)[..., None].astype(np.float32)
    return inside


def stain(rng: np.random.Generator, region: np.ndarray, surface: str, s: float) -> np.ndarray:
    """An irregular blob of a colour unlike the surface under it (rust, oil, residue...)."""
    h, w = region.shape[:2]
    m = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(m)
    draw.ellipse((w * 0.15, h * 0.15, w * 0.85, h * 0.85), fill=255)
    for _ in range(int(rng.integers(3, 7))):
        cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        rx, ry = rng.uniform(0.15, 0.5) * w, rng.uniform(0.15, 0.5) * h
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
    mask = np.asarray(m) > 0
    mean = region.reshape(-1, 3).mean(0)
    far = [c for c in STAIN_COLOURS if np.abs(np.array(c) - mean).max() > 70] or list(STAIN_COLOURS)
    colour = np.array(far[rng.integers(len(far))], np.float32)
    alpha = rng.uniform(0.65, 0.85) * (1 + 0.12 * np.clip(smooth_noise(rng, h, w, (3, 3)), -1, 1))
    _blend(region, mask, colour, np.clip(alpha, 0.5, 0.95))
    return mask


def missing_part(rng: np.random.Generator, region: np.ndarray, surface: str, s: float) -> np.ndarray:
    """A hole where a part should be (dark with a bright rim); on a board, often an empty two-pad footprint."""
    h, w = region.shape[:2]
    if surface == "board" and rng.random() < 0.6:
        patch = Image.fromarray(np.clip(region, 0, 255).astype(np.uint8))
        copper = (200, 170, 90) if rng.random() < 0.5 else (190, 190, 195)
        draw_passive(ImageDraw.Draw(patch), rng, w, h, s, copper, mounted=False, box=(0, 0, w - 1, h - 1))
        region[:] = np.asarray(patch, dtype=np.float32)
        return np.ones((h, w), bool)
    outer = Image.new("L", (w, h), 0)
    ImageDraw.Draw(outer).ellipse((0, 0, w - 1, h - 1), fill=255)
    rim = max(1, round(min(h, w) * rng.uniform(0.1, 0.2)))
    inner = Image.new("L", (w, h), 0)
    ImageDraw.Draw(inner).ellipse((rim, rim, w - 1 - rim, h - 1 - rim), fill=255)
    outer_m, inner_m = np.asarray(outer) > 0, np.asarray(inner) > 0
    rim_colour = (200, 170, 90) if surface == "board" else (rng.uniform(195, 235),) * 3
    _blend(region, outer_m & ~inner_m, np.array(rim_colour, np.float32), 0.9)
    _blend(region, inner_m, np.float32(rng.uniform(8, 28)), 0.95)
    return outer_m


PAINTERS: tuple[Painter, ...] = (scratch, dent, crack, stain, missing_part)
