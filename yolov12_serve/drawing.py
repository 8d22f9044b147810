"""Boxes drawn on a picture, labelled as ultralytics' plots are (its palette): predict's `Result.plot()`,
`yolov12-ctl detect --save` and `snapshot --draw`, and the server's evidence pictures."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["PALETTE", "draw_boxes"]

# ultralytics' palette (hex), so plots look familiar
PALETTE = [tuple(int(h[i:i + 2], 16) for i in (0, 2, 4)) for h in (
    "FF3838", "FF9D97", "FF701F", "FFB21D", "CFD231", "48F90A", "92CC17", "3DDB86", "1A9334", "00D4BB",
    "2C99A8", "00C2FF", "344593", "6473FF", "0018EC", "8438FF", "520085", "CB38FF", "FF95C8", "FF37C7")]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def draw_boxes(image: np.ndarray, dets: np.ndarray, names: dict[int, str], labels: bool = True, conf: bool = True,
               line_width: int | None = None, ids: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 [H, W, 3] and [n, 6] detections -> a new RGB array with the boxes and their labels drawn (each
    prefixed with its track id from `ids` where that is not 0)."""
    h, w = image.shape[:2]
    lw = line_width or max(round((h + w) / 2 * 0.003), 2)
    canvas = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    draw = ImageDraw.Draw(canvas)
    font = _font(max(10, lw * 6)) if labels else None
    tracks = [0] * len(dets) if ids is None else np.asarray(ids).tolist()
    for (x1, y1, x2, y2, score, c), track in zip(np.asarray(dets, dtype=np.float32).reshape(-1, 6).tolist(), tracks,
                                                 strict=True):
        colour = PALETTE[int(c) % len(PALETTE)]
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=lw)
        if font is None:
            continue
        text = (f"#{track} " if track else "") + names.get(int(c), str(int(c))) + (f" {score:.2f}" if conf else "")
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        ty = y1 - th - 2 * lw if y1 - th - 2 * lw >= 0 else y1  # above the box, inside it at the top edge
        draw.rectangle((x1, ty, x1 + tw + 2 * lw, ty + th + 2 * lw), fill=colour)
        fg = (255, 255, 255) if sum(colour) < 400 else (0, 0, 0)
        draw.text((x1 + lw - left, ty + lw - top), text, fill=fg, font=font)
    return np.asarray(canvas)
