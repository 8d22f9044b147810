"""Frames pushed over gRPC: decode JPEG / PNG / raw RGB24 / BGR24 and letterbox them (in a worker thread).

JPEGs are decoded at reduced scale when the engine input is much smaller than the frame (libjpeg's
DCT scaling through Pillow's `draft`), which cuts decode time by up to 4x for big frames; JPEG and PNG
images are turned upright as their EXIF orientation says (as `yolov12-predict` does).
"""

from __future__ import annotations

import enum
import io
import threading
from collections.abc import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from engines.letterbox import Letterbox

from ..errors import InvalidArgumentError
from ..preprocess import letterbox_image, letterbox_upright
from ..runtime import release_freed_memory

__all__ = ["MAX_PIXELS", "MAX_SIDE", "Encoding", "decode_frame", "sniff_encoding"]

MAX_SIDE = 16384  # larger frames are refused (a decompression bomb guard as well)
MAX_PIXELS = 40_000_000  # encoded images decoding to more are refused: an 8K frame is 33M; a small PNG must not
                         # make the server allocate half a gigabyte (Pillow's own limit is 179M pixels)


ONE_AT_A_TIME_PIXELS = 16_000_000  # PNGs decoding to more (full size, no reduced decode) are decoded one at a time
_one_big_decode = threading.Lock()


class Encoding(enum.IntEnum):
    """Frame.data encodings (values equal the proto's Encoding numbers)."""

    UNSPECIFIED = 0
    JPEG = 1
    PNG = 2
    RGB24 = 3
    BGR24 = 4


def sniff_encoding(data: bytes) -> Encoding:
    """JPEG or PNG from the file signature, or InvalidArgumentError."""
    if data[:3] == b"\xff\xd8\xff":
        return Encoding.JPEG
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return Encoding.PNG
    raise InvalidArgumentError("frame data is neither JPEG nor PNG: set encoding (RGB24/BGR24 need width and height)")


def decode_frame(data: bytes, encoding: int, width: int, height: int,
                 plan: Callable[[tuple[int, int]], Letterbox]) -> tuple[np.ndarray, Letterbox]:
    """Decode one pushed frame and letterbox it with `plan(src_hw)`; InvalidArgumentError says what was wrong."""
    if not data:
        raise InvalidArgumentError("frame data is empty")
    try:
        enc = Encoding(encoding)
    except ValueError:
        raise InvalidArgumentError(f"unknown encoding {encoding}") from None
    if enc in (Encoding.RGB24, Encoding.BGR24):
        return _decode_raw(data, enc, width, height, plan)
    if enc == Encoding.UNSPECIFIED:
        enc = sniff_encoding(data)
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        w0, h0 = img.size
        if w0 > MAX_SIDE or h0 > MAX_SIDE:
            raise InvalidArgumentError(f"image is {w0}x{h0}; the largest side accepted is {MAX_SIDE}")
        if w0 * h0 > MAX_PIXELS:
            raise InvalidArgumentError(f"image is {w0}x{h0} ({w0 * h0 / 1e6:.0f}M pixels); at most "
                                       f"{MAX_PIXELS / 1e6:.0f}M pixels are accepted (an 8K frame is 33M)")
        if (enc == Encoding.JPEG) != (fmt == "JPEG") or (enc == Encoding.PNG) != (fmt == "PNG"):
            raise InvalidArgumentError(f"encoding says {enc.name} but the data is {fmt}")
        if fmt == "JPEG" or w0 * h0 < ONE_AT_A_TIME_PIXELS:
            return letterbox_upright(img, plan)
        with _one_big_decode:  # a few hundred MB each: four at once took 2 GB
            try:
                return letterbox_upright(img, plan)
            finally:
                del img
                release_freed_memory()
    except InvalidArgumentError:
        raise
    except Image.DecompressionBombError:  # Pillow's own limit, met before ours when a header claims a huge size
        raise InvalidArgumentError(f"image is larger than accepted: at most {MAX_PIXELS / 1e6:.0f}M pixels and "
                                   f"{MAX_SIDE} on a side") from None
    except UnidentifiedImageError:  # its text names a BytesIO object
        raise InvalidArgumentError(f"cannot decode the {enc.name} image: the data is not an image Pillow "
                                   "recognises (truncated or corrupt?)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidArgumentError(f"cannot decode the {enc.name} image: {e}") from None


def _decode_raw(data: bytes, enc: Encoding, width: int, height: int,
                plan: Callable[[tuple[int, int]], Letterbox]) -> tuple[np.ndarray, Letterbox]:
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise InvalidArgumentError(f"{enc.name} frames need width and height in 1..{MAX_SIDE}, got {width}x{height}")
    if len(data) != width * height * 3:
        raise InvalidArgumentError(f"{enc.name} {width}x{height} needs {width * height * 3} bytes, got {len(data)}")
    image = np.frombuffer(data, np.uint8).reshape(height, width, 3)
    if enc == Encoding.BGR24:
        image = image[..., ::-1]
    lb = plan((height, width))
    return letterbox_image(np.ascontiguousarray(image), lb), lb
