"""Training augmentations of the YOLOv12 recipe and the evaluation letterbox (OpenCV + numpy).

A sample is a dict: `img` (uint8 (h, w, 3) RGB), `cls` (int64 [n]), `boxes` (float32 [n, 4] xyxy in pixels
of `img`), `rng` (the numpy Generator every random choice is drawn from, so a sample is reproducible from
its seed), plus `im_file`, `ori_shape`, `ratio_pad` and, for rectangular batches, `rect_shape`. Each
transform is a small class with `__call__(sample) -> sample` that moves the boxes exactly with the pixels
and never writes into the input image (it may be a cached array). The pipeline, as ultralytics builds it:

    Mosaic -> RandomAffine -> CopyPaste -> MixUp (of two such samples) -> RandomHSV -> RandomFlip (ud, lr)

Copy-paste here works on boxes (the labels have no masks): it pastes the mirrored pixels of a box where
the mirrored box overlaps no other box, so every label stays exact. (ultralytics' copy-paste needs
polygon labels and does nothing on box-only datasets.) It runs after the affine rather than before as in
ultralytics: mirroring commutes with a rotation-free affine, and the image is 4x smaller there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np

__all__ = [
    "RECIPE", "Compose", "CopyPaste", "LetterBox", "MixUp", "Mosaic", "RandomAffine", "RandomFlip", "RandomHSV",
    "box_candidates", "check_hyp", "default_hyp", "scale_defaults",
]

Sample = dict[str, Any]
PAD_VALUE = 114

# The official recipe (reference/yolov12.md "Training recipe"); scale/mixup/copy_paste depend on the model scale.
RECIPE: dict[str, float] = {
    "mosaic": 1.0, "degrees": 0.0, "translate": 0.1, "scale": 0.5, "shear": 0.0, "perspective": 0.0,
    "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4, "flipud": 0.0, "fliplr": 0.5, "mixup": 0.0, "copy_paste": 0.1,
}
_SCALE_DEFAULTS = {"n": (0.5, 0.0, 0.1), "s": (0.9, 0.05, 0.15), "m": (0.9, 0.15, 0.4), "l": (0.9, 0.15, 0.5),
                   "x": (0.9, 0.2, 0.6)}


def scale_defaults(scale_letter: str) -> dict[str, float]:
    """The per-scale augmentation strengths of the recipe: {'scale', 'mixup', 'copy_paste'} for n/s/m/l/x."""
    key = str(scale_letter).lower()
    if key not in _SCALE_DEFAULTS:
        raise ValueError(f"unknown model scale {scale_letter!r}; expected one of {', '.join(_SCALE_DEFAULTS)}")
    return dict(zip(("scale", "mixup", "copy_paste"), _SCALE_DEFAULTS[key]))


def default_hyp(scale_letter: str = "n") -> dict[str, float]:
    """The full augmentation recipe for a model scale (the dataset's `hyp`)."""
    return {**RECIPE, **scale_defaults(scale_letter)}


def check_hyp(hyp: Mapping[str, Any] | None) -> dict[str, float]:
    """The recipe keys of `hyp` (other keys, e.g. a trainer's lr0, are ignored) over the n-scale defaults, checked."""
    out = dict(default_hyp("n"))
    for key, value in (hyp or {}).items():
        if key in RECIPE:
            out[key] = float(value)
    for key in ("mosaic", "flipud", "fliplr", "mixup", "copy_paste", "hsv_h", "hsv_s", "hsv_v", "translate"):
        if not 0 <= out[key] <= 1:
            raise ValueError(f"augmentation '{key}'={out[key]} must be in [0, 1]")
    if not 0 <= out["scale"] < 1:
        raise ValueError(f"augmentation 'scale'={out['scale']} must be in [0, 1) (zoom range 1 +/- scale)")
    return out


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample


def box_candidates(before: np.ndarray, after: np.ndarray, wh_thr: float = 2, ar_thr: float = 100,
                   area_thr: float = 0.1, eps: float = 1e-16) -> np.ndarray:
    """Boxes that survive an augmentation (ultralytics' rule): wider and taller than `wh_thr` px, aspect below
    `ar_thr`, and keeping more than `area_thr` of their (scaled) area. Boxes are [n, 4] xyxy."""
    w1, h1 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w2, h2 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    ar = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (ar < ar_thr)


def _clip_boxes(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    out = boxes.copy()
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
    return out


class Mosaic:
    """Four images on a (2s, 2s) canvas around a random centre: the sample and three random others (p: chance)."""

    def __init__(self, load: Callable[[int], Sample], size: int, count: int, p: float = 1.0) -> None:
        self.load, self.size, self.count, self.p = load, size, count, p

    def __call__(self, sample: Sample) -> Sample:
        rng: np.random.Generator = sample["rng"]
        if self.p <= 0 or rng.random() >= self.p:
            return sample
        s = self.size
        parts = [sample] + [self.load(int(i)) for i in rng.integers(0, self.count, 3)]
        yc, xc = (int(v) for v in rng.uniform(s // 2, 2 * s - s // 2, 2))
        canvas = np.full((2 * s, 2 * s, 3), PAD_VALUE, np.uint8)
        boxes, classes = [], []
        for i, part in enumerate(parts):
            img = part["img"]
            h, w = img.shape[:2]
            if i == 0:  # top left
                x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
                x1b, y1b = w - (x2a - x1a), h - (y2a - y1a)
            elif i == 1:  # top right
                x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, 2 * s), yc
                x1b, y1b = 0, h - (y2a - y1a)
            elif i == 2:  # bottom left
                x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(2 * s, yc + h)
                x1b, y1b = w - (x2a - x1a), 0
            else:  # bottom right
                x1a, y1a, x2a, y2a = xc, yc, min(xc + w, 2 * s), min(2 * s, yc + h)
                x1b, y1b = 0, 0
            canvas[y1a:y2a, x1a:x2a] = img[y1b:y1b + (y2a - y1a), x1b:x1b + (x2a - x1a)]
            boxes.append(part["boxes"] + np.array([x1a - x1b, y1a - y1b] * 2, np.float32))
            classes.append(part["cls"])
        all_boxes = _clip_boxes(np.concatenate(boxes), 2 * s, 2 * s)
        keep = (all_boxes[:, 2] > all_boxes[:, 0]) & (all_boxes[:, 3] > all_boxes[:, 1])
        return {**sample, "img": canvas, "boxes": all_boxes[keep], "cls": np.concatenate(classes)[keep]}


class CopyPaste:
    """Paste mirrored copies of a fraction `p` of the boxes whose mirror image overlaps no box (labels stay exact)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, sample: Sample) -> Sample:
        boxes = sample["boxes"]
        if self.p <= 0 or len(boxes) == 0:
            return sample
        img = sample["img"]
        w = img.shape[1]
        mirrored = boxes[:, [2, 1, 0, 3]] * np.array([-1, 1, -1, 1], np.float32) + np.array([w, 0, w, 0], np.float32)
        patch = np.concatenate([np.floor(mirrored[:, :2]), np.ceil(mirrored[:, 2:])], 1)
        free = ~_intersects(patch, boxes).any(1)
        candidates = np.flatnonzero(free)
        chosen = sample["rng"].permutation(candidates)[: round(self.p * len(candidates))]
        if len(chosen) == 0:
            return sample
        out = img.copy()
        flipped = img[:, ::-1]
        for x1, y1, x2, y2 in patch[chosen].astype(int):
            out[y1:y2, x1:x2] = flipped[y1:y2, x1:x2]
        return {**sample, "img": out, "boxes": np.concatenate([boxes, mirrored[chosen]]),
                "cls": np.concatenate([sample["cls"], sample["cls"][chosen]])}


def _intersects(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] True where boxes overlap with positive area."""
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return (iw > 0) & (ih > 0)


class RandomAffine:
    """Random scale and translation (rotation, shear, perspective when set) into an output of `size` (h, w).

    The input centre maps to the output centre +/- translate; a `rect_shape` in the sample overrides `size`.
    Boxes move with their four corners and are filtered by `box_candidates`.
    """

    def __init__(self, size: tuple[int, int], degrees: float = 0.0, translate: float = 0.1, scale: float = 0.5,
                 shear: float = 0.0, perspective: float = 0.0) -> None:
        self.size, self.degrees, self.translate, self.scale = size, degrees, translate, scale
        self.shear, self.perspective = shear, perspective

    def __call__(self, sample: Sample) -> Sample:
        rng: np.random.Generator = sample["rng"]
        img = sample["img"]
        out_h, out_w = (int(v) for v in sample.get("rect_shape", self.size))
        C = np.eye(3, dtype=np.float32)
        C[0, 2], C[1, 2] = -img.shape[1] / 2, -img.shape[0] / 2
        P = np.eye(3, dtype=np.float32)
        P[2, 0], P[2, 1] = rng.uniform(-self.perspective, self.perspective, 2)
        R = np.eye(3, dtype=np.float32)
        s = rng.uniform(1 - self.scale, 1 + self.scale)
        R[:2] = cv2.getRotationMatrix2D(angle=rng.uniform(-self.degrees, self.degrees), center=(0, 0), scale=s)
        S = np.eye(3, dtype=np.float32)
        S[0, 1], S[1, 0] = (math.tan(a * math.pi / 180) for a in rng.uniform(-self.shear, self.shear, 2))
        T = np.eye(3, dtype=np.float32)
        T[0, 2], T[1, 2] = rng.uniform(0.5 - self.translate, 0.5 + self.translate, 2) * (out_w, out_h)
        M = T @ S @ R @ P @ C
        if self.perspective:
            out = cv2.warpPerspective(img, M, dsize=(out_w, out_h), borderValue=(PAD_VALUE,) * 3)
        else:
            out = cv2.warpAffine(img, M[:2], dsize=(out_w, out_h), borderValue=(PAD_VALUE,) * 3)
        boxes = sample["boxes"]
        moved = _clip_boxes(self._move(boxes, M), out_h, out_w)
        keep = box_candidates(boxes * s, moved)
        return {**sample, "img": out, "boxes": moved[keep], "cls": sample["cls"][keep]}

    def _move(self, boxes: np.ndarray, M: np.ndarray) -> np.ndarray:
        n = len(boxes)
        if n == 0:
            return boxes
        xy = np.ones((n * 4, 3), np.float32)
        xy[:, :2] = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(n * 4, 2)
        xy = xy @ M.T
        xy = (xy[:, :2] / xy[:, 2:3] if self.perspective else xy[:, :2]).reshape(n, 8)
        x, y = xy[:, 0::2], xy[:, 1::2]
        return np.stack([x.min(1), y.min(1), x.max(1), y.max(1)], 1).astype(np.float32)


class MixUp:
    """Blend with a second augmented sample (weight ~ Beta(32, 32)) and keep both label sets (p: chance)."""

    def __init__(self, other: Callable[[np.random.Generator], Sample], p: float) -> None:
        self.other, self.p = other, p

    def __call__(self, sample: Sample) -> Sample:
        rng: np.random.Generator = sample["rng"]
        if self.p <= 0 or rng.random() >= self.p:
            return sample
        second = self.other(rng)
        r = rng.beta(32.0, 32.0)
        img = (sample["img"] * r + second["img"] * (1 - r)).astype(np.uint8)
        return {**sample, "img": img, "boxes": np.concatenate([sample["boxes"], second["boxes"]]),
                "cls": np.concatenate([sample["cls"], second["cls"]])}


class RandomHSV:
    """Random hue, saturation and value gains (fractions of the full range), through one lookup table."""

    def __init__(self, hgain: float, sgain: float, vgain: float) -> None:
        self.gains = np.array([hgain, sgain, vgain])

    def __call__(self, sample: Sample) -> Sample:
        if not self.gains.any():
            return sample
        r = sample["rng"].uniform(-1, 1, 3) * self.gains
        x = np.arange(256, dtype=np.float64)
        lut_hue = ((x + r[0] * 180) % 180).astype(np.uint8)
        lut_sat = np.clip(x * (r[1] + 1), 0, 255).astype(np.uint8)
        lut_val = np.clip(x * (r[2] + 1), 0, 255).astype(np.uint8)
        lut_sat[0] = 0  # keep greys grey
        lut = np.stack((lut_hue, lut_sat, lut_val), -1).reshape(1, 256, 3)
        hsv = cv2.LUT(cv2.cvtColor(sample["img"], cv2.COLOR_RGB2HSV), lut)
        return {**sample, "img": cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)}


class RandomFlip:
    """Mirror the image and boxes left-right ('horizontal') or up-down ('vertical') with probability p."""

    def __init__(self, p: float, direction: str = "horizontal") -> None:
        if direction not in ("horizontal", "vertical"):
            raise ValueError(f"flip direction {direction!r}: use 'horizontal' or 'vertical'")
        self.p, self.direction = p, direction

    def __call__(self, sample: Sample) -> Sample:
        if self.p <= 0 or sample["rng"].random() >= self.p:
            return sample
        img, boxes = sample["img"], sample["boxes"].copy()
        if self.direction == "horizontal":
            w = img.shape[1]
            boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
            img = img[:, ::-1]
        else:
            h = img.shape[0]
            boxes[:, [1, 3]] = h - boxes[:, [3, 1]]
            img = img[::-1]
        return {**sample, "img": img, "boxes": boxes}


class LetterBox:
    """Resize keeping the aspect ratio to fit `shape` (h, w) (or the sample's `rect_shape`), then pad it centred.

    With `scaleup=False` an image is only ever shrunk (ultralytics' validation setting). Updates `ratio_pad`
    to ((gain_h, gain_w), (pad_w, pad_h)) from original pixels so predictions map back.
    """

    def __init__(self, shape: tuple[int, int], scaleup: bool = False) -> None:
        self.shape, self.scaleup = shape, scaleup

    def __call__(self, sample: Sample) -> Sample:
        img = sample["img"]
        h, w = img.shape[:2]
        new_h, new_w = (int(v) for v in sample.get("rect_shape", self.shape))
        r = min(new_h / h, new_w / w)
        if not self.scaleup:
            r = min(r, 1.0)
        unpad_w, unpad_h = max(round(w * r), 1), max(round(h * r), 1)
        dw, dh = (new_w - unpad_w) / 2, (new_h - unpad_h) / 2
        top, bottom = round(dh - 0.1), round(dh + 0.1)
        left, right = round(dw - 0.1), round(dw + 0.1)
        if (unpad_w, unpad_h) != (w, h):
            img = cv2.resize(img, (unpad_w, unpad_h), interpolation=cv2.INTER_LINEAR)
        if top or bottom or left or right:
            img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
        boxes = sample["boxes"] * np.float32(r) + np.array([left, top, left, top], np.float32)
        (gain_h, gain_w), _ = sample["ratio_pad"]
        return {**sample, "img": img, "boxes": boxes, "ratio_pad": ((gain_h * r, gain_w * r), (left, top))}
