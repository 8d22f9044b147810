"""GetSnapshot: a camera's next picture, full size, as JPEG (to aim a camera, to draw its zone). The picture is taken
from the next frame the camera delivers, and only while someone waits for one: otherwise a frame costs one flag test.
"""

from __future__ import annotations

import io
import threading

import numpy as np
from PIL import Image

from .preprocess import source_picture

__all__ = ["JPEG_QUALITY", "PictureRequests", "PictureUnreadableError", "encode_jpeg"]

JPEG_QUALITY = 90


class PictureUnreadableError(Exception):
    """The frame came but its picture could not be made (a form the converter cannot read)."""


class _Waiter:
    __slots__ = ("done", "error", "frame_id", "picture")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.picture: np.ndarray | None = None
        self.frame_id = -1
        self.error = ""


class PictureRequests:
    """Callers waiting for a stream's next picture. `wanted` is read by the stream for every frame; the frame that
    comes while it is set gives its full picture (`offer`) to every caller waiting then."""

    def __init__(self) -> None:
        self.wanted = False
        self._lock = threading.Lock()
        self._waiting: list[_Waiter] = []

    def take(self, timeout: float) -> tuple[np.ndarray, int] | None:
        """The next frame's RGB picture [H, W, 3] and its frame id, or None when no frame came within `timeout`
        seconds; PictureUnreadableError when one came whose picture could not be made."""
        waiter = _Waiter()
        with self._lock:
            self._waiting.append(waiter)
            self.wanted = True
        if not waiter.done.wait(timeout):
            with self._lock:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)
                self.wanted = bool(self._waiting)
        if waiter.error:  # (a frame may have come between the wait's end and the lock)
            raise PictureUnreadableError(waiter.error)
        return None if waiter.picture is None else (waiter.picture, waiter.frame_id)

    def offer(self, prepare: object, frame_id: int) -> None:
        """A frame came (its deferred letterbox, see preprocess.source_picture): hand its picture to the waiting.
        Runs in the camera's thread, so it never raises: a picture it cannot make is the waiters' error."""
        with self._lock:
            waiting, self._waiting, self.wanted = self._waiting, [], False
        picture, error = None, ""
        try:
            make = source_picture(prepare)
            if make is None:
                error = f"its frames come as {type(prepare).__name__}, which has no picture to take"
            else:
                picture = make()
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        for waiter in waiting:
            waiter.picture, waiter.frame_id, waiter.error = picture, frame_id, error
            waiter.done.set()


def encode_jpeg(picture: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """RGB uint8 [H, W, 3] -> JPEG bytes."""
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(picture)).save(out, format="JPEG", quality=quality)
    return out.getvalue()
