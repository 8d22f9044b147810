"""Textured surfaces for synthetic inspection frames: brushed metal, woven fabric, circuit board, conveyor belt.

Each function draws an (h, w, 3) float32 RGB image in 0..255 from a numpy Generator, with numpy and PIL only
(the server's demo cameras use these without OpenCV or torch). Sizes scale with the image so that a frame
at 320 and at 1280 look alike.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SURFACES", "belt", "board", "fabric", "metal", "planes", "sensor_noise", "smooth_noise"]

FABRIC_COLOURS = ((40, 55, 110), (190, 175, 140), (120, 120, 125), (95, 105, 60), (150, 60, 55), (70, 95, 140))
MASK_COLOURS = ((25, 105, 50), (20, 80, 40), (25, 60, 120), (35, 35, 40))


@functools.cache
def _noise_bank() -> np.ndarray:
    """A fixed (1024, 1024, 3) field of standard normals, made once per process (drawing fresh normals for every
    frame costs more than the rest of the frame)."""
    return np.random.default_rng(0x5EED).standard_normal((1024, 1024, 3), dtype=np.float32)


def sensor_noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Per-pixel standard-normal noise (h, w, 3) float32: a random crop of a fixed field (tiled for large frames)."""
    bank = _noise_bank()
    if h > bank.shape[0] or w > bank.shape[1]:
        bank = np.tile(bank, (-(-h // bank.shape[0]), -(-w // bank.shape[1]), 1))
    y = int(rng.integers(0, bank.shape[0] - h + 1))
    x = int(rng.integers(0, bank.shape[1] - w + 1))
    return bank[y:y + h, x:x + w]


def planes(lum: np.ndarray, scale: tuple[float, ...] = (1, 1, 1), offset: tuple[float, ...] = (0, 0, 0)
           ) -> np.ndarray:
    """An (h, w, 3) image whose channel c is `lum * scale[c] + offset[c]` (faster than numpy broadcasting over c)."""
    out = np.empty((*lum.shape, 3), np.float32)
    for c in range(3):
        np.multiply(lum, np.float32(scale[c]), out=out[..., c])
        out[..., c] += np.float32(offset[c])
    return out


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: tuple[int, int]) -> np.ndarray:
    """Low-frequency noise (h, w) float32 with unit-ish amplitude: a `cells` grid of normals, bilinearly enlarged."""
    grid = rng.standard_normal(cells, dtype=np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.BILINEAR), dtype=np.float32)


def metal(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Brushed metal: grey with a faint tint, fine streaks along one direction, and a broad sheen."""
    vertical = rng.random() < 0.5
    hh, ww = (w, h) if vertical else (h, w)
    streaks = smooth_noise(rng, hh, ww, (hh, max(2, ww // 24)))  # long along x, fine along y
    if vertical:
        streaks = streaks.T
    sheen = smooth_noise(rng, h, w, (3, 3))
    base = rng.uniform(105, 185) * (1 + rng.uniform(-0.05, 0.05, 3))
    lum = streaks * np.float32(rng.uniform(4, 10)) + sheen * np.float32(rng.uniform(6, 14))
    return planes(lum, offset=tuple(base))


def fabric(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Woven fabric: a basket weave of warp and weft threads, each shaded across its width."""
    scale = max(1.0, min(h, w) / 320)
    period = max(3, round(rng.uniform(4, 8) * scale))
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    across_v = 0.72 + 0.28 * np.sin(np.pi * ((x % period) + 0.5) / period)
    across_h = 0.72 + 0.28 * np.sin(np.pi * ((y % period) + 0.5) / period)
    warp = ((x // period + y // period) % 2) == 0
    shade = np.where(warp, across_v, across_h)
    colour = np.array(FABRIC_COLOURS[rng.integers(len(FABRIC_COLOURS))]) * (1 + rng.uniform(-0.1, 0.1, 3))
    blotch = 1 + 0.06 * smooth_noise(rng, h, w, (4, 4))
    return planes(shade * blotch, scale=tuple(colour))


def board(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Circuit board: solder mask with traces, vias, pads and mounted parts (ICs and two-pad passives)."""
    s = max(1.0, min(h, w) / 320)
    mask = np.array(MASK_COLOURS[rng.integers(len(MASK_COLOURS))], np.float32)
    im = Image.new("RGB", (w, h), tuple(int(c) for c in mask))
    draw = ImageDraw.Draw(im)
    trace = tuple(int(min(255, c * 1.45 + 12)) for c in mask)
    copper = (200, 170, 90) if rng.random() < 0.5 else (190, 190, 195)
    area = h * w / (320 * s) ** 2  # how many 320-px squares the frame holds at this scale
    for _ in range(int(rng.integers(8, 16) * area)):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        points = [(x, y)]
        for _ in range(int(rng.integers(1, 4))):
            length = int(rng.uniform(20, 120) * s)
            dx, dy = [(1, 0), (0, 1), (1, 1), (1, -1)][rng.integers(4)]
            sign = 1 if rng.random() < 0.5 else -1
            x, y = x + sign * dx * length, y + sign * dy * length
            points.append((x, y))
        draw.line(points, fill=trace, width=max(1, round(rng.uniform(1.5, 3.5) * s)))
        r = max(2, round(2.5 * s))
        end = points[-1]
        draw.ellipse((end[0] - r, end[1] - r, end[0] + r, end[1] + r), fill=copper)
    for _ in range(int(rng.integers(2, 5) * area)):
        _draw_ic(draw, rng, w, h, s)
    for _ in range(int(rng.integers(4, 10) * area)):
        draw_passive(draw, rng, w, h, s, copper, mounted=True)
    return np.asarray(im, dtype=np.float32) + sensor_noise(rng, h, w) * 1.5


def _draw_ic(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, s: float) -> None:
    bw, bh = int(rng.uniform(18, 45) * s), int(rng.uniform(12, 30) * s)
    x0, y0 = int(rng.integers(0, max(1, w - bw))), int(rng.integers(0, max(1, h - bh)))
    pin, gap = max(1, round(1.5 * s)), max(3, round(4 * s))
    for px in range(x0 + gap // 2, x0 + bw - pin, gap):
        draw.rectangle((px, y0 - 2 * pin, px + pin, y0 + bh + 2 * pin), fill=(185, 185, 190))
    draw.rectangle((x0, y0, x0 + bw, y0 + bh), fill=(28, 28, 30))


def draw_passive(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, s: float,
                 copper: tuple[int, int, int], mounted: bool, box: tuple[int, int, int, int] | None = None) -> None:
    """A two-pad part: `mounted` draws its dark body between metal end caps; otherwise the empty footprint
    (silkscreen outline, bare substrate, two pads) that a missing part leaves."""
    if box is None:
        long, short = int(rng.uniform(8, 16) * s), int(rng.uniform(4, 7) * s)
        bw, bh = (long, short) if rng.random() < 0.5 else (short, long)
        x0, y0 = int(rng.integers(0, max(1, w - bw))), int(rng.integers(0, max(1, h - bh)))
        box = (x0, y0, x0 + bw - 1, y0 + bh - 1)
    x0, y0, x1, y1 = box
    horizontal = (x1 - x0) >= (y1 - y0)
    if horizontal:
        pad = max(1, (x1 - x0 + 1) // 4)
        ends = [(x0, y0, x0 + pad - 1, y1), (x1 - pad + 1, y0, x1, y1)]
    else:
        pad = max(1, (y1 - y0 + 1) // 4)
        ends = [(x0, y0, x1, y0 + pad - 1), (x0, y1 - pad + 1, x1, y1)]
    if mounted:
        draw.rectangle(box, fill=(60, 45, 35) if rng.random() < 0.5 else (25, 25, 28))
        for e in ends:
            draw.rectangle(e, fill=(190, 190, 195))
        return
    draw.rectangle(box, fill=(176, 152, 104), outline=(240, 240, 235), width=1)  # bare FR4 inside the silkscreen
    i = 2
    for ex0, ey0, ex1, ey1 in ends:
        pad_box = (max(ex0, x0 + i), max(ey0, y0 + i), min(ex1, x1 - i), min(ey1, y1 - i))
        if pad_box[2] >= pad_box[0] and pad_box[3] >= pad_box[1]:
            draw.rectangle(pad_box, fill=copper)


def belt(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A dark rubber conveyor belt with ribs across the direction of travel (x)."""
    s = max(1.0, min(h, w) / 320)
    period = max(6, round(rng.uniform(14, 26) * s))
    x = np.arange(w)
    ribs = np.where((x % period) < max(2, period // 5), 0.7, 1.0).astype(np.float32)
    out = sensor_noise(rng, h, w) * np.float32(3)
    out.reshape(h, w * 3)[:] += np.repeat(ribs * np.float32(rng.uniform(38, 62)), 3)[None]
    return out


SURFACES: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "metal": metal, "fabric": fabric, "board": board,
}
