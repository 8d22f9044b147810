"""Synthetic conveyor cameras for the demo and benchmarks: `synthetic://NAME?fps=25&size=640x360&seed=1&speed=6`.

Each camera renders one belt strip once: `strip` parts side by side, each a frame-sized scene with its
defects (trainer.data.synth.render_scene: numpy + Pillow, no torch), and slides a window along it, so a
frame costs a box of one picture of the strip (resized once it reaches an engine), not a render. A frame
the engine takes at its own size (320x180 at 320) is a view of the strip array, padded in one copy:
through Pillow it was crop, export and pad, 0.42 ms of the worker's CPU per frame at saturation, now 0.14.
Frames come at the camera's rate in real time, at a phase of their own (seeded by name and seed); when
the machine falls behind, ticks are skipped (a camera does not wait for its reader).
"""

from __future__ import annotations

import functools
import math
import random
import threading
import time
import weakref
import zlib
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

from ..errors import InvalidArgumentError
from ..frames import now
from ..preprocess import letterbox_image
from .base import FrameSink, Source, StreamState

STOP_CHECK_S = 0.1  # a slow camera's thread notices its removal within this long

__all__ = ["SyntheticCamera", "SyntheticSource", "parse_synthetic_url", "render_strip"]


@dataclass(frozen=True)
class SyntheticCamera:
    """What a synthetic:// URL asks for."""

    name: str
    fps: float = 25.0
    size: tuple[int, int] = (360, 640)  # (h, w)
    seed: int = 0
    speed: int = 6  # belt pixels per frame
    strip: int = 4  # strip length in frame widths


def parse_synthetic_url(url: str) -> SyntheticCamera:
    """`synthetic://NAME?fps=..&size=WxH&seed=..&speed=..` -> SyntheticCamera (InvalidArgumentError if malformed)."""
    parts = urlsplit(url)
    name = (parts.netloc + parts.path).strip("/") or "camera"
    q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(q) - {"fps", "size", "seed", "speed"}
    if unknown:
        raise InvalidArgumentError(f"synthetic url: unknown parameters {sorted(unknown)} (fps, size=WxH, seed, speed)")
    try:
        fps = float(q.get("fps", 25))
        w, h = (int(v) for v in q.get("size", "640x360").lower().split("x"))
        seed = int(q.get("seed", zlib.crc32(name.encode())))
        speed = int(q.get("speed", 6))
    except ValueError:
        raise InvalidArgumentError(f"synthetic url {url!r}: fps and seed are numbers, size is WIDTHxHEIGHT") from None
    if not (0 < fps <= 240 and 32 <= w <= 4096 and 32 <= h <= 4096):
        raise InvalidArgumentError(f"synthetic url {url!r}: need 0 < fps <= 240 and sizes within 32..4096")
    return SyntheticCamera(name, fps, (h, w), seed, speed)


_strips: weakref.WeakValueDictionary[tuple, np.ndarray] = weakref.WeakValueDictionary()
_rendering: dict[tuple, threading.Lock] = {}  # one renders a strip, its twins wait for it; others run meanwhile
_strips_lock = threading.Lock()


def render_strip(cam: SyntheticCamera) -> np.ndarray:
    """A belt strip of `strip` parts (frame-sized scenes with defects), plus the first again to wrap around.
    Cameras of the same size and seed share one (read-only) strip while any of them runs: a benchmark's hundreds
    of cameras render a few strips, not one each (0.2 s of CPU and 0.9 MB each at 320x180)."""
    key = (cam.size, cam.seed, cam.strip)
    with _strips_lock:
        lock = _rendering.setdefault(key, threading.Lock())
    with lock:
        found = _strips.get(key)
        if found is None:
            found = _render_strip(cam)
            found.flags.writeable = False
            _strips[key] = found
    return found


def _render_strip(cam: SyntheticCamera) -> np.ndarray:
    from trainer.data.synth import render_scene

    h, w = cam.size
    rng = np.random.default_rng(cam.seed)
    parts = [np.asarray(render_scene(rng, (h, w))[0][..., :3], dtype=np.uint8) for _ in range(cam.strip)]
    return np.ascontiguousarray(np.concatenate([*parts, parts[0]], axis=1))


class SyntheticSource(Source):
    """A demo camera: a belt scrolling past at a fixed rate."""

    kind = "synthetic"

    def __init__(self, sink: FrameSink, url: str) -> None:
        super().__init__(sink)
        self.camera = parse_synthetic_url(url)

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True, name=f"source-{self.sink.stream_id}").start()

    def _run(self) -> None:
        cam = self.camera
        try:
            strip: np.ndarray | None = render_strip(cam)
        except Exception as e:
            self.sink.set_state(StreamState.FAILED, f"cannot render the synthetic scene: {type(e).__name__}: {e}")
            return
        picture: Image.Image | None = None
        h, w = cam.size
        period = strip.shape[1] - w
        fps = min(cam.fps, self.sink.max_fps) if self.sink.max_fps > 0 else cam.fps
        dt = 1.0 / fps
        self.sink.set_state(StreamState.STREAMING)
        # Real cameras are not synchronised: each keeps its own fixed phase. Cameras added together would
        # otherwise all tick together once their strips are rendered (frames arriving in bursts).
        t0 = (math.floor(now() / dt) + 1 + random.Random(f"{cam.name}:{cam.seed}").random()) * dt
        self._stopped.wait(max(0.0, t0 - now()))
        tick = 0
        while not self.stopped:
            x = (tick * cam.speed) % period
            lb = self.sink.plan((h, w))
            self.last_frame_at = now()  # the letterbox runs only if the frame reaches an engine (as for RTSP)
            # One form of the strip is kept, the one the engine's input needs (both would double a camera's memory):
            # the array where frames are only padded (one copy of a view), a PIL image where they are resized
            # (a box of it: no array-to-image copy per frame). A stream moved to another engine converts once.
            if lb.new_hw == (h, w):
                if strip is None:
                    strip, picture = np.asarray(picture), None
                image = strip
            else:
                if picture is None:
                    picture, strip = Image.fromarray(strip), None
                image = picture
            self.sink.put(functools.partial(letterbox_image, image, lb, (x, 0, x + w, h)), lb, time.time_ns() // 1000)
            tick += 1
            wait = t0 + tick * dt - now()
            if wait < -dt:  # fell behind: skip the ticks already missed
                tick = int((now() - t0) / dt) + 1
                wait = t0 + tick * dt - now()
            while wait > 0 and not self.stopped:  # a plain sleep: 15 us of CPU a tick against 35 for Event.wait
                time.sleep(min(wait, STOP_CHECK_S))
                wait = t0 + tick * dt - now()
