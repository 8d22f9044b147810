"""Letterbox geometry (numpy only, no torch): fit a frame into the engine's input and map boxes back.

A stream is fitted to the smallest stride-multiple rectangle of its aspect ratio within the
engine's size (640x360 at 320 -> 320x192), so wide frames run on fewer pixels than a square.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["CAMERA_ASPECTS", "Letterbox", "aspect_shapes", "fit_shape", "pick_shape", "plan_letterbox"]

CAMERA_ASPECTS = ((9, 16), (3, 4), (1, 1), (4, 3), (16, 9))  # (h, w): 16:9 and 4:3 cameras, square, their portraits


def fit_shape(src_hw: tuple[int, int], max_hw: tuple[int, int], stride: int = 32,
              rect: bool = True) -> tuple[int, int]:
    """Input (h, w) for a `src_hw` frame: scale to fit `max_hw`, then round up to stride multiples (rect)."""
    if not rect:
        return max_hw
    h0, w0 = src_hw
    r = min(max_hw[0] / h0, max_hw[1] / w0)
    h = min(max_hw[0], math.ceil(round(h0 * r, 6) / stride) * stride)
    w = min(max_hw[1], math.ceil(round(w0 * r, 6) / stride) * stride)
    return int(h), int(w)


def aspect_shapes(max_hw: tuple[int, int], stride: int = 32) -> list[tuple[int, int]]:
    """The inputs common cameras get within `max_hw` (CAMERA_ASPECTS), and `max_hw` itself: a finite set to prepare
    an engine for (CUDA graphs) and to plan every camera within (pick_shape)."""
    shapes = [fit_shape((h * 120, w * 120), max_hw, stride) for h, w in CAMERA_ASPECTS]
    return list(dict.fromkeys([*shapes, (int(max_hw[0]), int(max_hw[1]))]))


def pick_shape(src_hw: tuple[int, int], shapes: list[tuple[int, int]], max_hw: tuple[int, int],
               stride: int = 32) -> tuple[int, int]:
    """The input (h, w) for a `src_hw` frame on an engine that takes only `shapes` (a TensorRT engine built with
    --shapes: one optimisation profile each; a PyTorch engine's CUDA-graph shapes): the smallest of them that
    keeps the frame at the scale `fit_shape` would give it, else the one that shrinks it least (ties: the
    smaller). A 4:3 camera on an engine built for 640x640 and 384x640 runs at 640x640, not at the 480x640
    no profile covers."""
    if not shapes:
        raise ValueError("pick_shape needs at least one shape")
    h0, w0 = src_hw
    ideal = fit_shape(src_hw, max_hw, stride, rect=True)
    want = min(ideal[0] / h0, ideal[1] / w0) * (1 - 1e-9)

    def scale(hw: tuple[int, int]) -> float:
        return min(hw[0] / h0, hw[1] / w0)

    keeping = [hw for hw in shapes if scale(hw) >= want]
    if keeping:
        return min(keeping, key=lambda hw: hw[0] * hw[1])
    return min(shapes, key=lambda hw: (-scale(hw), hw[0] * hw[1]))


@dataclass(frozen=True)
class Letterbox:
    """How one source shape maps into one input shape: resize by `ratio` to `new_hw`, pad by (`left`, `top`)."""

    src_hw: tuple[int, int]
    input_hw: tuple[int, int]
    new_hw: tuple[int, int]
    ratio: float
    left: int
    top: int

    def unscale(self, dets: np.ndarray) -> np.ndarray:
        """[n, 6] boxes in input pixels -> source-frame pixels (clipped to the frame); scores/classes untouched.

        In-place arithmetic on views (no fancy indexing): it runs once per served frame.
        """
        if not len(dets):  # most frames of an inspection camera: nothing found, nothing to map
            return np.zeros((0, 6), np.float32)
        out = np.array(dets, dtype=np.float32, copy=True).reshape(-1, 6)
        xy = out[:, :4].reshape(-1, 2, 2)  # [n, (x1, y1) / (x2, y2), (x, y)]
        xy -= np.array([self.left, self.top], np.float32)
        xy /= np.float32(self.ratio)
        np.clip(xy[..., 0], 0, self.src_hw[1], out=xy[..., 0])
        np.clip(xy[..., 1], 0, self.src_hw[0], out=xy[..., 1])
        return out

    def place(self, resized: np.ndarray, fill: int = 114, out: np.ndarray | None = None) -> np.ndarray:
        """Pad an already-resized [new_h, new_w, 3] image to the input shape (grey borders); into `out` (uint8
        [h, w, 3], e.g. one frame of a batch array) when given, so a batch is not copied again to stack it."""
        h, w = self.input_hw
        if resized.shape[:2] == (h, w):
            if out is None:
                return resized
            out[...] = resized
            return out
        (top, left), (nh, nw) = (self.top, self.left), self.new_hw
        if out is None:
            out = np.empty((h, w, 3), dtype=np.uint8)  # write each pixel once: borders grey, the middle the image
        out[:top], out[top + nh:], out[top:top + nh, :left], out[top:top + nh, left + nw:] = fill, fill, fill, fill
        out[top:top + nh, left:left + nw] = resized
        return out


def plan_letterbox(src_hw: tuple[int, int], input_hw: tuple[int, int]) -> Letterbox:
    """The resize ratio and centred padding that fit `src_hw` into `input_hw` keeping the aspect ratio."""
    r = min(input_hw[0] / src_hw[0], input_hw[1] / src_hw[1])
    new_h, new_w = max(1, round(src_hw[0] * r)), max(1, round(src_hw[1] * r))
    top, left = (input_hw[0] - new_h) // 2, (input_hw[1] - new_w) // 2
    return Letterbox(src_hw, input_hw, (new_h, new_w), r, left, top)
