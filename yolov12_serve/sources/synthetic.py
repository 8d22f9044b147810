"""Synthetic conveyor cameras for the demo and benchmarks: `synthetic://NAME?fps=25&size=640x360&seed=1&speed=6`.

Each camera renders one belt strip once: `strip` parts side by side, each a frame-sized scene with its
defects (trainer.data.synth.render_scene: numpy + Pillow, no torch), and slides a window along it, so a
frame costs a box of one picture of the strip (resized once it reaches an engine), not a render. A frame
the engine takes at its own size (320x180 at 320) is a view of the strip array, padded in one copy:
through Pillow it was crop, export and pad, 0.42 ms of the worker's CPU per frame at saturation, now 0.14.
Frames come at the camera's rate in real time, at a phase of their own (seeded by name and seed); when
the machine falls behind, ticks are skipped (a camera does not wait for its reader). One thread per process
ticks all synthetic cameras (`_Ticker`); cameras of one size and seed share their strip.
"""

from __future__ import annotations

import functools
import heapq
import logging
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

STOP_CHECK_S = 0.1
TICK_QUANTUM_S = 0.002  # the ticker wakes at most once per this long and ticks every camera due by its end
log = logging.getLogger(__name__)  # a slow camera's thread notices its removal within this long

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


class _Ticker:
    """One thread ticks every synthetic camera of the process, each at its own rate and phase (a heap of next tick
    times). A thread per camera woke 25 times a second each: hundreds of cameras (a benchmark's) were thousands of
    threads contending for the interpreter lock with the engine workers, for a few microseconds of work each. The
    one thread wakes at most once per TICK_QUANTUM_S and ticks every camera due by then (up to that much early):
    woken for each tick, 1,024 cameras took and gave back the lock 25,000 times a second."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, SyntheticSource]] = []
        self._cond = threading.Condition()
        self._seq = 0
        self._thread: threading.Thread | None = None

    def add(self, source: SyntheticSource, when: float) -> None:
        with self._cond:
            self._seq += 1
            heapq.heappush(self._heap, (when, self._seq, source))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True, name="synthetic-cameras")
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                wait = self._heap[0][0] - now()
                if wait > 0:
                    self._cond.release()
                    try:  # a plain sleep: 15 us of CPU a tick against 35 for a condition's timed wait
                        time.sleep(min(wait, STOP_CHECK_S))
                    finally:
                        self._cond.acquire()
                    continue
                due = []
                until = now() + TICK_QUANTUM_S
                while self._heap and self._heap[0][0] <= until:
                    due.append(heapq.heappop(self._heap)[2])
            later = []
            for source in due:
                if source.stopped:
                    continue
                try:
                    when = source._tick()
                except Exception:  # one camera's failure must not stop the others
                    log.exception("synthetic camera %s failed", source.sink.stream_id)
                    continue
                if when is not None:
                    later.append((when, source))
            with self._cond:
                for when, source in later:
                    self._seq += 1
                    heapq.heappush(self._heap, (when, self._seq, source))


_ticker = _Ticker()


class SyntheticSource(Source):
    """A demo camera: a belt scrolling past at a fixed rate (ticked by the process's one `_Ticker` thread)."""

    kind = "synthetic"

    def __init__(self, sink: FrameSink, url: str) -> None:
        super().__init__(sink)
        self.camera = parse_synthetic_url(url)
        self._strip: np.ndarray | None = None
        self._picture: Image.Image | None = None
        self._t0 = 0.0
        self._dt = 1.0
        self._n = 0

    def start(self) -> None:
        threading.Thread(target=self._begin, daemon=True, name=f"source-{self.sink.stream_id}").start()

    def _begin(self) -> None:
        """Render the strip (its own thread: 0.2 s at 320x180), then join the ticker at the camera's phase."""
        cam = self.camera
        try:
            self._strip = render_strip(cam)
        except Exception as e:
            self.sink.set_state(StreamState.FAILED, f"cannot render the synthetic scene: {type(e).__name__}: {e}")
            return
        fps = min(cam.fps, self.sink.max_fps) if self.sink.max_fps > 0 else cam.fps
        self._dt = 1.0 / fps
        if self.stopped:
            return
        self.sink.set_state(StreamState.STREAMING)
        # Real cameras are not synchronised: each keeps its own fixed phase. Cameras added together would
        # otherwise all tick together once their strips are rendered (frames arriving in bursts).
        self._t0 = (math.floor(now() / self._dt) + 1 + random.Random(f"{cam.name}:{cam.seed}").random()) * self._dt
        _ticker.add(self, self._t0)

    def _tick(self) -> float | None:
        """Hand over the frame of this tick; returns when the next is due (ticks missed meanwhile are skipped)."""
        t = self.last_frame_at = now()
        if self.sink.admit(t):
            self._hand_over()
        else:  # shed under overload: skip the frames that would be shed too (counted as shed by the sink)
            self._n += self.sink.shed_ahead(self._dt)
        self._n += 1
        t = now()
        if self._t0 + self._n * self._dt < t - self._dt:  # fell behind: skip the ticks already missed
            self._n = int((t - self._t0) / self._dt) + 1
        return None if self.stopped else self._t0 + self._n * self._dt

    def _hand_over(self) -> None:
        """Put this tick's frame: a box of the strip, letterboxed only if the frame reaches an engine (as for RTSP)."""
        cam = self.camera
        h, w = cam.size
        strip, picture = self._strip, self._picture
        period = (strip.shape[1] if strip is not None else picture.size[0]) - w
        x = (self._n * cam.speed) % period
        lb = self.sink.plan((h, w))
        # One form of the strip is kept, the one the engine's input needs (both would double a camera's memory):
        # the array where frames are only padded (one copy of a view), a PIL image where they are resized
        # (a box of it: no array-to-image copy per frame). A stream moved to another engine converts once.
        if lb.new_hw == (h, w):
            if strip is None:
                strip = self._strip = np.asarray(picture)
                self._picture = None
            image = strip
        else:
            if picture is None:
                picture = self._picture = Image.fromarray(strip)
                self._strip = None
            image = picture
        self.sink.put(functools.partial(letterbox_image, image, lb, (x, 0, x + w, h)), lb, time.time_ns() // 1000)
