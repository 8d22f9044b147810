"""Fit source frames into the engine input: plan the letterbox once per source shape, resize, pad (no torch, no cv2).

Pushed images are fitted in the push handler; a camera's frames are fitted by the worker that runs them
(a frame superseded in its mailbox is never converted). Images are resized with Pillow (which releases
the GIL): by whole factors with `Image.reduce` (a box filter: the same pixels as the trainer's
cv2 INTER_LINEAR at 2x, and 4x faster than Pillow's bilinear), otherwise bilinear. PyAV frames are
resized by swscale in their own pixel format, then converted to RGB at the engine's size, with its area
filter at whole factors for the same reason (its bilinear filter blurs: up to 65 levels off the
trainer's pixels at 2x).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from engines.letterbox import Letterbox, fit_shape, pick_shape, plan_letterbox

if TYPE_CHECKING:
    import av

    from engines.base import EngineInfo

__all__ = ["AvPicture", "InputPlanner", "check_eight_bit", "letterbox_avframe", "letterbox_image", "letterbox_upright",
           "small_grey", "source_picture"]

EXIF_ORIENTATION = 0x0112  # how the camera was held: 1 upright; 5-8 a quarter turn (width and height trade places)
SHRINK_FIRST_PIXELS = 16_000_000  # a decoded PNG (no reduced decode) this big is scaled down first: see shrink()
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})


def check_eight_bit(img: Image.Image) -> None:
    """ValueError for an image deeper than 8 bits a channel (a 16-bit machine-vision TIFF or PNG): Pillow would clip
    it to white, and how to scale it to 8 bits is the model's business (as its training images were), not a guess."""
    if img.mode not in EIGHT_BIT_MODES:
        raise ValueError(f"a {img.format or ''} image in mode {img.mode} (more than 8 bits a channel): convert it to "
                         "8-bit RGB the way the model's training images were, then send that")


class InputPlanner:
    """Picks each source shape's engine input: the smallest stride-multiple rectangle of its aspect within imgsz, or,
    on an engine that takes a fixed list of `shapes` (EngineInfo.shapes: a TensorRT engine built with --shapes),
    the best of those (engines.letterbox.pick_shape)."""

    def __init__(self, imgsz: tuple[int, int], stride: int = 32, dynamic_hw: bool = True,
                 shapes: list[tuple[int, int]] | None = None) -> None:
        self.imgsz = (int(imgsz[0]), int(imgsz[1]))
        self.stride = int(stride)
        self.dynamic_hw = dynamic_hw
        self.shapes = [(int(h), int(w)) for h, w in shapes] if shapes and dynamic_hw else None
        self.plan = functools.lru_cache(maxsize=64)(self._plan)

    @classmethod
    def for_engine(cls, info: EngineInfo) -> InputPlanner:
        """The planner for an engine: its size, stride, dynamic H/W and the shapes it was built or prepared for (a
        TensorRT engine's profiles, a PyTorch engine's CUDA graphs), from its metadata."""
        return cls(info.imgsz, info.stride, info.dynamic_hw, info.plan_shapes)

    @property
    def full_shape(self) -> tuple[int, int]:
        """The largest input frames get: imgsz, or the built shape a frame of that size gets."""
        return self.input_shape(self.imgsz)

    def input_shape(self, src_hw: tuple[int, int]) -> tuple[int, int]:
        """The engine input (h, w) frames of `src_hw` get."""
        if self.shapes is not None:
            return pick_shape(src_hw, self.shapes, self.imgsz, self.stride)
        return fit_shape(src_hw, self.imgsz, self.stride, rect=self.dynamic_hw)

    def _plan(self, src_hw: tuple[int, int]) -> Letterbox:
        return plan_letterbox(src_hw, self.input_shape(src_hw))


def letterbox_image(image: np.ndarray | Image.Image, lb: Letterbox,
                    box: tuple[int, int, int, int] | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 [H, W, 3] or a PIL image (possibly JPEG-draft-reduced), or its `box` (left, top, right, bottom),
    -> the letterboxed engine input (written into `out` when given: a frame of the batch array). A source that
    keeps its picture as a PIL image and passes the box of each frame skips the array-to-image copy a frame
    would cost (0.3 of 0.8 ms at 640x360 on our 2 cores)."""
    if isinstance(image, np.ndarray):
        if box is not None:
            image, box = image[box[1]:box[3], box[0]:box[2]], None
        if image.shape[:2] == lb.new_hw:
            if lb.new_hw != lb.input_hw or out is not None:
                return lb.place(image, out=out)
            return np.ascontiguousarray(image)
        image = Image.fromarray(image)
    pil = image if image.mode == "RGB" else image.convert("RGB")
    box = box or (0, 0, *pil.size)
    size = (box[2] - box[0], box[3] - box[1])
    new_h, new_w = lb.new_hw
    factor = size[0] // new_w
    if factor >= 2 and size == (new_w * factor, new_h * factor):
        pil = pil.reduce(factor, box=box)  # 640x360 -> 320x180 and the like: a box average, 4x faster than bilinear
    else:
        if box != (0, 0, *pil.size):
            pil = pil.crop(box)  # a resize within a box would filter in pixels from outside it
        if size != (new_w, new_h):
            pil = pil.resize((new_w, new_h), Image.BILINEAR, reducing_gap=None)
    return lb.place(np.asarray(pil), out=out)


def letterbox_upright(img: Image.Image, plan: Callable[[tuple[int, int]], Letterbox]) -> tuple[np.ndarray, Letterbox]:
    """An opened (not yet loaded) JPEG or PNG -> its letterboxed engine input and plan, turned upright as its EXIF
    orientation says (a phone photo taken in portrait is stored sideways: boxes then come in the picture's pixels as
    every viewer shows it). A JPEG is decoded at the smallest scale >= the engine's size (libjpeg's DCT scaling).
    ValueError for an image deeper than 8 bits a channel."""
    check_eight_bit(img)
    w0, h0 = img.size
    orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    turned = orientation in (5, 6, 7, 8)
    lb = plan((w0, h0) if turned else (h0, w0))
    nh, nw = lb.new_hw
    if img.format == "JPEG":
        img.draft("RGB", (nh, nw) if turned else (nw, nh))
    img.load()
    if w0 * h0 >= SHRINK_FIRST_PIXELS and img.format != "JPEG":  # no reduced decode: shrink before turning it
        img = shrink(img if img.mode in ("RGB", "L") else img.convert("RGB"), (nh, nw) if turned else (nw, nh))
    return letterbox_image(ImageOps.exif_transpose(img) if orientation != 1 else img, lb), lb


def shrink(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A big decoded picture scaled to `size` (w, h) as letterbox_image would, before it is turned or converted:
    a 40M-pixel RGBA PNG turned first cost a second full-size copy (0.5 GB for one 155 KB file)."""
    factor = img.width // size[0]
    if factor >= 2 and img.size == (size[0] * factor, size[1] * factor):
        return img.reduce(factor)
    return img.resize(size, Image.BILINEAR, reducing_gap=None)


def letterbox_avframe(frame: av.VideoFrame, lb: Letterbox, out: np.ndarray | None = None) -> np.ndarray:
    """A decoded PyAV frame -> the letterboxed engine input (into `out` when given).

    Scaled in the frame's own format first (a camera's planar YUV 4:2:0 is half the bytes of RGB, and its
    chroma is already at half size), then converted at the small size: 640x360 -> 320x180 costs 180 us of
    CPU instead of 340 as one scale-and-convert pass, as near the box average of the RGB frame (what the
    trainer's resize gives): 0.8-1.4 levels off it on average against 1.0-1.2. On the calling thread:
    PyAV >= 17 otherwise hands each call to a pool of swscale threads, and on cores busy with inference
    the worker slept waiting for them (4-5% of its time beside 12 RTSP cameras; 500 us of CPU a frame)."""
    new_h, new_w = lb.new_hw
    factor = frame.width // new_w
    whole = factor >= 2 and (frame.width, frame.height) == (new_w * factor, new_h * factor)
    small = frame.reformat(width=new_w, height=new_h, interpolation="AREA" if whole else "BILINEAR", threads=1)
    return lb.place(small.to_ndarray(format="rgb24", threads=1), out=out)


def _deferred(prepare: object) -> tuple[str, Any, tuple[int, int, int, int] | None]:
    """What a camera's deferred letterbox holds: ("av", the PyAV frame, None), ("image", a synthetic camera's strip,
    the frame's box in it), or ("", None, None) for anything else (a pushed frame is already an array)."""
    if not isinstance(prepare, functools.partial) or not prepare.args:
        return "", None, None
    if prepare.func is letterbox_avframe:
        return "av", prepare.args[0], None
    if prepare.func is letterbox_image:
        return "image", prepare.args[0], prepare.args[2] if len(prepare.args) > 2 else prepare.keywords.get("box")
    return "", None, None


class AvPicture:
    """A decoded PyAV frame kept as it came (YUV), made RGB only when its full picture is asked for."""

    __slots__ = ("frame",)

    def __init__(self, frame: av.VideoFrame) -> None:
        self.frame = frame

    def __call__(self) -> np.ndarray:
        return self.frame.to_ndarray(format="rgb24")


def source_picture(prepare: object) -> Callable[[], np.ndarray] | None:
    """The full source picture behind a camera's deferred letterbox (`letterbox_avframe` on a decoded PyAV frame,
    `letterbox_image` on a synthetic camera's strip and the box of the frame), as a call making RGB [H, W, 3];
    None for anything else. For predict's `orig_img` and GetSnapshot: only when asked, never per frame."""
    kind, image, box = _deferred(prepare)
    if kind == "av":
        return AvPicture(image)
    if kind != "image":
        return None

    def crop() -> np.ndarray:
        rgb = np.asarray(image if isinstance(image, np.ndarray) else image.convert("RGB"))
        return rgb[box[1]:box[3], box[0]:box[2]] if box is not None else rgb

    return crop


def small_grey(prepare: object, size: tuple[int, int] = (64, 36)) -> np.ndarray | None:
    """The frame behind a camera's deferred letterbox (see `source_picture`) shrunk to about `size` (w, h) in grey,
    uint8, for the blank and frozen picture check; None for other forms. Cheap, as it runs for every camera every
    few seconds: nearest pixels, no filter (a flat or repeated picture stays one when sampled)."""
    kind, image, box = _deferred(prepare)
    if kind == "av":  # nearest pixels: 14 us from a 1080p frame on the AMD EPYC VM (2 cores), bicubic ~440
        return image.reformat(width=size[0], height=size[1], format="gray", interpolation="POINT",
                              threads=1).to_ndarray()
    if kind != "image":
        return None
    if isinstance(image, np.ndarray):
        left, top, right, bottom = box or (0, 0, image.shape[1], image.shape[0])
        step_x, step_y = max(1, (right - left) // size[0]), max(1, (bottom - top) // size[1])
        return np.ascontiguousarray(image[top:bottom:step_y, left:right:step_x, 1])  # green: near enough to grey
    return np.asarray(image.resize(size, Image.NEAREST, box=box).convert("L"))
