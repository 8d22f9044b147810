"""Where a pulled camera's video is decoded (`--decode cpu|nvdec|auto`): on the CPU, or on the GPU's NVDEC engines.

PyAV's wheels carry FFmpeg with NVIDIA's decoders and the `cuda` hardware device: a stream opened with
`av.open(url, hwaccel=HWAccel("cuda", ...))` is decoded by NVDEC (FFmpeg's native H.264/HEVC decoder with its
nvdec hwaccel), and each frame comes back to system memory (NV12), where the letterbox resize runs as before
(swscale in the source's thread). What moves to the GPU is the entropy decoding and reconstruction, the
largest part of a 1080p frame's CPU cost.

The decoders run in the GPU's primary CUDA context, the one the engines use (cudactx.py makes it current on the
source's thread and FFmpeg takes it with `current_ctx=1`): no context per stream, no time-slicing between
decoding and inference.

Choice per stream, at each (re)connect:
  cpu    always the CPU (the default).
  nvdec  NVDEC on the stream's GPU (GPU 0 for a stream served on the CPU); when NVDEC cannot be used on this
         machine, the CPU, with one warning per process.
  auto   NVDEC when the stream is served on a GPU and NVDEC works there, else the CPU (logged once).
A stream whose hardware decoding fails later falls back to the CPU with a warning, and asks for NVDEC again
after a quiet period that doubles while it keeps failing (rtsp.py does that).
"""

from __future__ import annotations

import io
import logging
import threading
from functools import lru_cache
from typing import TYPE_CHECKING

from ..config import DECODE_MODES
from .cudactx import make_current

if TYPE_CHECKING:
    from av import VideoFrame
    from av.codec.hwaccel import HWAccel
    from av.video.codeccontext import VideoCodecContext

__all__ = ["DECODE_MODES", "decoded_on_gpu", "gpu_index", "hwaccel_for", "nvdec_problem"]

log = logging.getLogger(__name__)

_logged: set[str] = set()
_logged_lock = threading.Lock()


def _log_once(level: int, message: str) -> None:
    with _logged_lock:
        if message in _logged:
            return
        _logged.add(message)
    log.log(level, message)


def gpu_index(device: str) -> int | None:
    """The CUDA ordinal of a device name ('cuda:1' -> 1, 'cuda' -> 0), None for 'cpu' or ''."""
    if not device.startswith("cuda"):
        return None
    _, _, index = device.partition(":")
    return int(index) if index.isdigit() else 0


@lru_cache(maxsize=16)
def nvdec_problem(gpu: int = 0) -> str | None:
    """Why NVDEC cannot decode H.264 on GPU `gpu` here (None when it can); checked once per GPU by decoding a
    tiny H.264 stream through the CUDA hwaccel (the CUDA device alone can open while the driver's video
    library, libnvcuvid, is missing, and FFmpeg would then quietly decode in software)."""
    try:
        import av
    except ImportError as e:
        return f"PyAV is not installed ({e})"
    try:
        from av.codec.hwaccel import hwdevices_available
    except ImportError:
        return f"PyAV {av.__version__} has no hardware decoding (it came with PyAV 14)"
    if "cuda" not in hwdevices_available():
        return f"this PyAV's FFmpeg has no CUDA hardware device (it lists {hwdevices_available()})"
    if "h264_cuvid" not in av.codecs_available:
        return "this PyAV's FFmpeg was built without NVIDIA's decoders"
    try:
        _cuda_hwaccel(gpu, fallback=False).create(av.Codec("h264", "r"))
    except Exception as e:  # no driver, no such GPU, ...
        return f"cannot open CUDA device {gpu} for decoding ({_describe(e)})"
    try:
        sample = _tiny_h264()
    except Exception:  # no encoder in this FFmpeg: the device check above is all we can do
        return None
    try:
        with av.open(io.BytesIO(sample), format="h264", hwaccel=_cuda_hwaccel(gpu, fallback=False)) as c:
            video = c.streams.video[0]
            frames = list(c.decode(video))
    except Exception as e:
        return f"NVDEC failed on a test H.264 stream on GPU {gpu} ({_describe(e)})"
    if not frames or not decoded_on_gpu(video.codec_context, frames[0]):
        return (f"NVDEC did not decode a test H.264 stream on GPU {gpu} (FFmpeg fell back to software; is the "
                "driver's video library libnvcuvid missing?)")
    return None


def decoded_on_gpu(ctx: VideoCodecContext, frame: VideoFrame) -> bool:
    """Whether a frame from an hwaccel-opened decoder came from the GPU: the decoder's format is 'cuda', or the
    frame is NV12/P010 (what NVDEC hands back; FFmpeg's software H.264/HEVC decoders give planar YUV)."""
    return ctx.pix_fmt == "cuda" or frame.format.name in ("nv12", "p010le", "p016le")


def _tiny_h264(frames: int = 3, size: tuple[int, int] = (144, 256)) -> bytes:
    """A few frames of raw H.264 (Annex B) made by libx264, to try a decoder on."""
    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="h264") as out:
        s = out.add_stream("libx264", rate=25)
        s.height, s.width = size
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.full((*size, 3), 40 * i, np.uint8)
            for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)
    return buf.getvalue()


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip() or 'no detail'}"


def _cuda_hwaccel(gpu: int, fallback: bool) -> HWAccel:
    """PyAV's CUDA acceleration on GPU `gpu`, in its primary context, which this makes current on the calling
    thread (FFmpeg takes the current context when the stream is opened)."""
    from av.codec.hwaccel import HWAccel

    make_current(gpu)
    return HWAccel("cuda", device=str(gpu), allow_software_fallback=fallback, options={"current_ctx": "1"})


def hwaccel_for(mode: str, device: str) -> HWAccel | None:
    """The PyAV hardware acceleration for a stream served on `device` ('cpu', 'cuda:N') under `--decode mode`,
    or None to decode on the CPU; call it on the thread that opens the stream. Never raises for a missing GPU:
    that is logged once and the CPU used."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode {mode!r}: use one of {', '.join(DECODE_MODES)}")
    if mode == "cpu":
        return None
    gpu = gpu_index(device)
    if mode == "auto" and gpu is None:
        _log_once(logging.INFO, "--decode auto: streams served on the CPU are decoded on the CPU")
        return None
    gpu = gpu or 0
    problem = nvdec_problem(gpu)
    if problem is not None:
        if mode == "auto":
            _log_once(logging.INFO, f"--decode auto: decoding on the CPU: NVDEC unavailable: {problem}")
        else:
            _log_once(logging.WARNING, f"--decode nvdec: NVDEC unavailable, decoding on the CPU instead: {problem}")
        return None
    _log_once(logging.INFO, f"--decode {mode}: decoding cameras on NVDEC (GPU {gpu}), frames copied back to "
              "system memory for the letterbox resize")
    # allow_software_fallback: a stream NVDEC cannot take (a profile it lacks) is decoded by FFmpeg in software
    return _cuda_hwaccel(gpu, fallback=True)
