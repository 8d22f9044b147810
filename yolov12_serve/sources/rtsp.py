"""Cameras pulled with PyAV (RTSP over TCP, or video files with --allow-files), one thread per stream.

Connection: TCP transport, socket and read timeouts, low-delay flags (no demuxer buffering), a short
probe. Decoding and the letterbox resize (swscale) run in this thread; PyAV releases the GIL meanwhile.
Failures: any error (refused, timeout, server gone, stream ended) -> RECONNECTING with `last_error`,
then a retry after exponential backoff with jitter, forever until the stream is removed. Only errors
that retrying cannot fix (no video track, no decoder for the codec, a missing file) -> FAILED.
Stalls: the server's watchdog calls `restart()` when STREAMING brings no frame for `stall_s`; the stuck
thread is abandoned (it exits at its next wake-up, when its read times out) and a fresh one connects.
Files are paced at their own frame rate and loop at the end, like a camera that never stops.
"""

from __future__ import annotations

import logging
import threading
import time

from ..config import RtspOptions, redact_url
from ..frames import now
from ..preprocess import letterbox_avframe
from .backoff import Backoff
from .base import FrameSink, Source, StreamState

__all__ = ["AvSource", "PermanentSourceError"]

log = logging.getLogger(__name__)


class PermanentSourceError(RuntimeError):
    """A source problem that retrying cannot fix (the stream goes FAILED)."""


def _describe(e: BaseException) -> str:
    text = str(e).strip() or repr(e)
    return f"{type(e).__name__}: {text}"


class AvSource(Source):
    """An RTSP camera (or a video file) decoded by PyAV in its own thread, reconnected with backoff."""

    kind = "rtsp"
    watchdog = True

    def __init__(self, sink: FrameSink, url: str, options: RtspOptions, is_file: bool = False) -> None:
        super().__init__(sink)
        self.url = url
        self.options = options
        self.is_file = is_file
        self.kind = "file" if is_file else "rtsp"
        self._gen = 0
        self._lock = threading.Lock()
        self._streaming = False

    def start(self) -> None:
        self._spawn()

    def restart(self, reason: str) -> None:
        """Abandon the current (stalled) connection and start a fresh one."""
        with self._lock:
            if self.stopped:
                return
            self._streaming = False
            self.sink.set_state(StreamState.RECONNECTING, reason)
            self.sink.count_reconnect()
            self.last_frame_at = now()
            self._spawn()

    def _spawn(self) -> None:
        self._gen += 1
        t = threading.Thread(target=self._run, args=(self._gen,), daemon=True,
                             name=f"source-{self.sink.stream_id}-{self._gen}")
        t.start()

    def _current(self, gen: int) -> bool:
        return gen == self._gen and not self.stopped

    def _av_options(self) -> dict[str, str]:
        if self.is_file:
            return {}
        return {
            "rtsp_transport": "tcp",
            "timeout": str(int(self.options.read_timeout_s * 1e6)),  # socket timeout, microseconds
            "fflags": "nobuffer",
            "flags": "low_delay",
            "max_delay": "0",
            "analyzeduration": "500000",
            "probesize": "500000",
        }

    def _run(self, gen: int) -> None:
        backoff = Backoff(self.options.backoff_base_s, self.options.backoff_cap_s)
        while self._current(gen):
            try:
                self._stream_once(gen, backoff)
                if not self._current(gen):
                    break
                if self.is_file:
                    continue  # end of file: start again, like a camera that keeps sending
                raise ConnectionError("the server ended the stream")
            except PermanentSourceError as e:
                if self._current(gen):
                    log.error("stream %s failed: %s", self.sink.stream_id, e)
                    self.sink.set_state(StreamState.FAILED, str(e))
                return
            except Exception as e:
                with self._lock:
                    if not self._current(gen):
                        break
                    self._streaming = False
                    msg = _describe(e)
                    log.warning("stream %s: %s; reconnecting", self.sink.stream_id, msg)
                    self.sink.set_state(StreamState.RECONNECTING, msg)
                    self.sink.count_reconnect()
                self._stopped.wait(backoff.next_delay())

    def _stream_once(self, gen: int, backoff: Backoff) -> None:
        import av

        try:
            container = av.open(self.url, options=self._av_options(),
                                timeout=(self.options.open_timeout_s, self.options.read_timeout_s))
        except FileNotFoundError as e:
            if self.is_file:
                raise PermanentSourceError(f"no such file: {self.url}") from e
            raise
        except av.error.ExitError:  # PyAV's timeout interrupts FFmpeg; say what timed out
            raise TimeoutError(f"no answer within {self.options.open_timeout_s:g} s while connecting") from None
        try:
            if not container.streams.video:
                raise PermanentSourceError(f"{redact_url(self.url)} has no video track")
            video = container.streams.video[0]
            video.thread_type = "SLICE"  # slice threads add no latency; frame threads would buffer frames
            min_gap = 1.0 / self.sink.max_fps if self.sink.max_fps > 0 else 0.0
            last_emit = -1e9
            t_start, pts_start = None, None
            try:
                frames = container.decode(video)
                for frame in frames:
                    if not self._current(gen):
                        return
                    t = now()
                    self.last_frame_at = t
                    if not self._streaming:
                        with self._lock:
                            if not self._current(gen):
                                return
                            self._streaming = True
                            self.sink.set_state(StreamState.STREAMING)
                        backoff.reset()
                    if self.is_file and frame.time is not None:  # pace files at their own rate
                        if t_start is None:
                            t_start, pts_start = t, frame.time
                        wait = (frame.time - pts_start) - (t - t_start)
                        if wait > 0:
                            self._stopped.wait(wait)
                            t = now()
                    if min_gap and t - last_emit < min_gap * 0.95:
                        continue
                    last_emit = t
                    lb = self.sink.plan((frame.height, frame.width))
                    image = letterbox_avframe(frame, lb)
                    self.sink.put(image, lb, time.time_ns() // 1000)
            except av.error.DecoderNotFoundError as e:
                raise PermanentSourceError(f"no decoder for {redact_url(self.url)}'s video: {e}") from e
            except av.error.ExitError:
                raise TimeoutError(f"no data for {self.options.read_timeout_s:g} s") from None
        finally:
            container.close()
