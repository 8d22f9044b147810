"""What `predict` reads: the `source` argument resolved into inputs, and the offline inputs read frame by frame.

- Offline (read as fast as the engine takes them, every frame, in order): image files, folders and globs of
  images and videos, video files, numpy arrays (RGB uint8 [H, W, 3], or [N, H, W, 3] for N frames) and PIL
  images. Images are decoded with Pillow (JPEGs at reduced scale when the engine input is much smaller, as the
  server decodes pushed JPEGs, turned upright as their EXIF orientation says) and letterboxed with the
  server's `letterbox_upright`; videos are decoded with PyAV and letterboxed with the server's
  `letterbox_avframe` (scaled in YUV, converted at the small size). A video file is not a camera here: it is
  read once, unpaced, and every frame is kept (the server's file source paces a file at its frame rate and
  loops it, as a recorded camera).
- Live (newest frame wins, as in the server): rtsp:// and rtsps:// cameras (and synthetic:// demo cameras),
  pulled by the server's own sources (sources/rtsp.py, sources/synthetic.py).

Everything a user can get wrong is checked before anything runs, and each mistake is one `SourceError`
naming the source: a missing path, an unsupported type or suffix, an empty folder, a glob matching nothing,
a video PyAV cannot open, an array of the wrong shape. Cameras are checked for their address here and for
reachability when they connect (the first connection failing is the error; later drops are reconnected).
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from engines.letterbox import Letterbox

from ..preprocess import (
    EXIF_ORIENTATION,
    AvPicture,
    check_eight_bit,
    letterbox_avframe,
    letterbox_image,
    letterbox_upright,
)

__all__ = ["IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "AvPicture", "Decoded", "Input", "SourceError", "Sources", "load_rgb",
           "resolve_sources"]

IMAGE_SUFFIXES = frozenset({".bmp", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp"})
VIDEO_SUFFIXES = frozenset({".asf", ".avi", ".gif", ".m4v", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".ts", ".wmv",
                            ".webm", ".h264", ".h265", ".hevc"})
LIVE_SCHEMES = ("rtsp", "rtsps", "synthetic")


class SourceError(ValueError):
    """A source that cannot be read; the message starts with the source."""


@dataclass
class Input:
    """One source the user named (a folder or glob holding videos gives one input for its images, one per video)."""

    name: str  # as results and errors show it: the path, the URL (password masked), 'array0'
    kind: str  # 'images', 'arrays', 'video' or 'live'
    paths: list[Path] = field(default_factory=list)  # images: the files, in order
    arrays: list[Any] = field(default_factory=list)  # arrays: RGB [H, W, 3] uint8 arrays or PIL images
    url: str = ""  # video: the file; live: the URL as given (credentials included)
    frames_hint: int = 0  # frames it will give (videos: from the container, 0 if unknown)

    @property
    def live(self) -> bool:
        return self.kind == "live"


@dataclass
class Sources:
    """The resolved `source` argument: inputs in the order named."""

    inputs: list[Input]

    @property
    def offline(self) -> list[Input]:
        return [i for i in self.inputs if not i.live]

    @property
    def live(self) -> list[Input]:
        return [i for i in self.inputs if i.live]

    def total(self, vid_stride: int = 1) -> int | None:
        """Frames the offline inputs will give (None when a video does not say how many it has)."""
        n = 0
        for i in self.offline:
            if i.kind == "video":
                if not i.frames_hint:
                    return None
                n += -(-i.frames_hint // vid_stride)
            else:
                n += len(i.paths) + len(i.arrays)
        return n


@dataclass
class Decoded:
    """One offline frame, letterboxed for the engine."""

    source: str
    path: str
    index: int
    input: np.ndarray  # uint8 [h, w, 3], the engine input
    letterbox: Letterbox
    picture: Callable[[], np.ndarray] | np.ndarray | Any  # the source frame, or how to make it (Result.orig_img)
    time: float | None
    preprocess_s: float


# ----------------------------------------------------------------------------------------------------- resolving
def resolve_sources(source: Any) -> Sources:
    """`source` (a path, folder, glob, URL, array, PIL image, or a list of these) -> Sources; SourceError if bad."""
    if isinstance(source, Sources):
        return source
    if source is None:
        raise SourceError("no source given: pass an image, a folder, a glob, a video, an rtsp:// URL, an array, "
                          "or a list of these")
    counter = [0]
    if isinstance(source, list | tuple):
        if not source:
            raise SourceError("the source list is empty")
        return Sources([i for s in source for i in _one(s, counter)])
    return Sources(_one(source, counter))


def _one(source: Any, counter: list[int]) -> list[Input]:
    if isinstance(source, np.ndarray):
        name = f"array{counter[0]}"
        counter[0] += 1
        frames = list(source) if source.ndim == 4 else [source]
        for k, a in enumerate(frames):
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or 0 in a.shape:
                what = f"{name}[{k}]" if source.ndim == 4 else name
                raise SourceError(f"{what}: expected an RGB uint8 array [H, W, 3] (or [N, H, W, 3]), got "
                                  f"{a.dtype} {list(a.shape) if source.ndim == 4 else list(source.shape)}")
        return [Input(name, "arrays", arrays=frames)]
    if isinstance(source, Image.Image):
        name = f"image{counter[0]}"
        counter[0] += 1
        try:
            check_eight_bit(source)  # a 16-bit or float image would be clipped to white by convert("RGB")
        except ValueError as e:
            raise SourceError(f"{name}: {e}") from None
        return [Input(name, "arrays", arrays=[source])]
    if isinstance(source, Path):
        return _path(source, str(source))
    if not isinstance(source, str):
        raise SourceError(f"unsupported source type {type(source).__name__}: pass a path, a folder, a glob, a video, "
                          "an rtsp:// URL, an RGB uint8 array, a PIL image, or a list of these")
    text = source.strip()
    if not text:
        raise SourceError("the source is an empty string")
    if "://" in text:
        return [_url(text)]
    if any(c in text for c in "*?[") and not Path(text).exists():  # 'shot[1].jpg' that exists is a file
        matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
        files = [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES]
        if not files:
            raise SourceError(f"{text}: the glob matches no image or video "
                              f"({len(matches)} paths, none with a known suffix)" if matches else
                              f"{text}: the glob matches nothing")
        return _files(text, files)
    return _path(Path(text), text)


def _url(url: str) -> Input:
    from ..config import redact_url, url_kind
    from ..errors import InvalidArgumentError

    scheme = url.split("://", 1)[0].lower()
    shown = redact_url(url)
    if scheme == "file":
        return _path(Path(url[len("file://"):]), url)
    if scheme not in LIVE_SCHEMES:
        raise SourceError(f"{shown}: unsupported URL scheme '{scheme}://' (cameras: rtsp:// or rtsps://; files: a "
                          "path; download http(s) files first)")
    try:
        url_kind(url)
    except InvalidArgumentError as e:
        raise SourceError(f"{shown}: {e}") from None
    return Input(shown, "live", url=url)


def _path(path: Path, name: str) -> list[Input]:
    if not path.exists():
        raise SourceError(f"{name}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
        if not files:
            raise SourceError(f"{name}: the folder holds no image or video (suffixes: "
                              f"{' '.join(sorted(IMAGE_SUFFIXES))}; {' '.join(sorted(VIDEO_SUFFIXES))})")
        return _files(name, files)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return [Input(name, "images", paths=[path])]
    if suffix in VIDEO_SUFFIXES:
        return [_video(path, name)]
    raise SourceError(f"{name}: unsupported file type '{path.suffix or '(no suffix)'}' (images: "
                      f"{' '.join(sorted(IMAGE_SUFFIXES))}; videos: {' '.join(sorted(VIDEO_SUFFIXES))})")


def _files(name: str, files: list[Path]) -> list[Input]:
    """A folder's or glob's files: its images as one input (in name order), then each video, checked like a named
    one (ultralytics' order too)."""
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    videos = [_video(p, str(p)) for p in files if p.suffix.lower() in VIDEO_SUFFIXES]
    return ([Input(name, "images", paths=images)] if images else []) + videos


def _video(path: Path, name: str) -> Input:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise SourceError(f"{name}: no video track in the file")
            frames = int(container.streams.video[0].frames or 0)
    except SourceError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise SourceError(f"{name}: not a readable video ({type(e).__name__}: {e})") from None
    return Input(name, "video", url=str(path), frames_hint=frames)


# ----------------------------------------------------------------------------------------------------- reading
Plan = Callable[[tuple[int, int]], Letterbox]


def read_offline(inputs: list[Input], plan: Plan, vid_stride: int = 1) -> Iterator[Decoded]:
    """Every offline frame of `inputs`, in order, letterboxed with `plan(src_hw)`; SourceError names a bad one."""
    for item in inputs:
        if item.kind == "images":  # frame: the image's position in its folder or glob (0 for a named image)
            for k, path in enumerate(item.paths):
                yield _read_image(item.name, path, k, plan)
        elif item.kind == "arrays":
            for k, a in enumerate(item.arrays):
                t0 = time.perf_counter()
                rgb = np.asarray(a.convert("RGB")) if isinstance(a, Image.Image) else a
                lb = plan(rgb.shape[:2])
                x = letterbox_image(rgb, lb)
                yield Decoded(item.name, item.name, k, x, lb, rgb, None, time.perf_counter() - t0)
        elif item.kind == "video":
            yield from _read_video(item, plan, vid_stride)


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file at full size as RGB uint8 [H, W, 3], turned upright as its EXIF orientation says."""
    with Image.open(path) as img:
        if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
            img = ImageOps.exif_transpose(img)
        return np.asarray(img.convert("RGB"))


def _read_image(source: str, path: Path, index: int, plan: Plan) -> Decoded:
    t0 = time.perf_counter()
    try:
        with Image.open(path) as img:
            x, lb = letterbox_upright(img, plan)
            if not x.flags.writeable:  # Pillow's own buffer (no resize was needed): torch warns on those
                x = x.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise SourceError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None
    return Decoded(source, str(path), index, x, lb, partial(load_rgb, path), None, time.perf_counter() - t0)


def _read_video(item: Input, plan: Plan, vid_stride: int) -> Iterator[Decoded]:
    import av

    index = 0
    try:
        container = av.open(item.url)
    except (av.error.FFmpegError, OSError) as e:
        raise SourceError(f"{item.name}: not a readable video ({type(e).__name__}: {e})") from None
    try:
        video = container.streams.video[0]
        if _cores() >= 8:  # frame threads keep a fast GPU fed with large video; on 2 busy cores they decoded a
            video.thread_type = "AUTO"  # 720p clip at 245 frames/s against 874 with the default (one thread here)
        t0 = time.perf_counter()
        for packet in container.demux(video):
            for frame in packet.decode():
                if index % vid_stride == 0:
                    lb = plan((frame.height, frame.width))
                    x = letterbox_avframe(frame, lb)
                    yield Decoded(item.name, item.url, index, x, lb, AvPicture(frame), frame.time,
                                  time.perf_counter() - t0)
                    t0 = time.perf_counter()  # skipped frames' decoding counts towards the next frame kept
                index += 1
    except av.error.FFmpegError as e:
        raise SourceError(f"{item.name}: cannot decode frame {index} ({type(e).__name__}: {e})") from None
    finally:
        container.close()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


