"""Cameras pulled with PyAV (RTSP over TCP, or video files with --allow-files), one thread per stream.

Connection: TCP transport (UDP for a camera that refuses TCP), socket and read timeouts, low-delay flags (no
demuxer buffering), a short probe. Decoding and the letterbox resize (swscale) run in this thread; PyAV releases
the GIL meanwhile.
Failures: any error (refused, timeout, server gone, stream ended) -> RECONNECTING with `last_error`,
then a retry after exponential backoff with jitter, forever until the stream is removed; logged on change
(faultlog.py: the first failure, a new reason, a summary at growing intervals, "streaming again"). A video packet the
decoder rejects as corrupt is skipped on the same connection (the decoder resyncs at the next slice). Only errors
that retrying cannot fix (no video track, no decoder for the codec, a missing file, a redirect to a host
the server refuses: redirects.py) -> FAILED.
Stalls: the server's watchdog calls `restart()` when STREAMING brings no frame for `stall_s`; the stuck
thread is abandoned (it exits at its next wake-up, when its read times out) and a fresh one connects.
Files are paced at their own frame rate and loop at the end, like a camera that never stops (a recording
replayed as a camera; the GPU check's 1080p cameras are such files): the loop seeks back to the start on the
same connection and keeps one schedule, so the seam has no gap and costs no decoder set-up.
Decoding: on the CPU, or on the GPU's NVDEC (`--decode`, chosen per connect by hwdecode.py). Frames come
back to system memory either way and are letterboxed here as before. When hardware decoding fails on a
stream that is otherwise fine (the decoder will not open, a packet fails in the hardware decoder, or corrupt
packets go on for a read timeout), the stream is reopened at once on the CPU, with a warning that says when NVDEC
is tried again: after a quiet period (10 min, doubling at each further give-up of the stream up to 4 h, said at
INFO; back to 10 min, warned, once NVDEC has decoded it for as long as the latest period). Most such failures pass
(a session limit hit while many cameras reconnect at once, a driver hiccup, a lossy link), and cameras left on the
CPU for good could saturate a GPU server's few cores. Once the period is over, the stream's next connect asks for
NVDEC again; a stream still streaming on the CPU reconnects for it (one info line, not a RECONNECTING or a counted
reconnect), since a healthy camera stays connected for weeks and would otherwise never leave the CPU: the cost is
one gap of a connect and a keyframe, at most once per period. A corrupt packet alone is skipped on the GPU as on
the CPU.
"""

from __future__ import annotations

import errno
import functools
import logging
import random
import threading
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..config import RtspOptions, redact_url, scrub_url
from ..faultlog import FaultLog
from ..frames import now
from ..preprocess import letterbox_avframe
from ..urls import redact_text
from . import interrupts, redirects
from .backoff import Backoff
from .base import FrameSink, Source, StreamState
from .hwdecode import decoded_on_gpu, hwaccel_for

if TYPE_CHECKING:
    import av
    from av.codec.hwaccel import HWAccel
    from av.container import InputContainer
    from av.video.stream import VideoStream

__all__ = ["AvSource", "PermanentSourceError"]

log = logging.getLogger(__name__)

# Frames up to this many pixels are decoded in the camera's own thread only. FFmpeg's slice threads woke two
# more threads per frame: with 12 cameras at 25 fps on 2 cores, ~6% more preemptions of the engine runs and
# 2-4% fewer results (bench (c) conditions), for 0.1 ms less decode time per 640x360 frame. Larger frames
# keep them: a 4K frame took 13-16 ms in one thread here, 8-10 ms with slice threads.
ONE_DECODER_THREAD_UP_TO = 1920 * 1088

# After NVDEC is given up on a stream, it decodes on the CPU this long before NVDEC is asked for again. 10 min: the
# usual causes (a decoder session limit while many cameras reconnect at once, a driver hiccup, a burst of loss on
# the link) are over within minutes, and a stream whose NVDEC fails each time costs at most one switch (a gap of a
# connect and a keyframe) and one log line per period. Doubling at each give-up that follows a short run on NVDEC,
# up to 4 h: a stream NVDEC never takes costs 6 tries a day, and one whose cause went away (sessions freed, a
# driver fixed) is back on the GPU within a shift. Each wait is drawn up to 20% longer, so that the cameras that
# gave up together (a session limit) do not all try again at the same instant.
NVDEC_RETRY_FIRST_S = 600.0
NVDEC_RETRY_MAX_S = 4 * 3600.0
NVDEC_RETRY_JITTER = 0.2


class PermanentSourceError(RuntimeError):
    """A source problem that retrying cannot fix (the stream goes FAILED)."""


class _HardwareDecodeError(RuntimeError):
    """NVDEC failed on a packet of a stream that was open and readable: reopen it decoding on the CPU."""


def _duration(seconds: float) -> str:
    """A wait of minutes or hours, as a log line says it."""
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _describe(e: BaseException) -> str:
    """The error in one line, URLs in it masked: FFmpeg's errors quote the URL, password included."""
    return redact_text(f"{type(e).__name__}: {_own_text(e)}")


def _own_text(e: BaseException) -> str:
    """The error's own text: PyAV appends FFmpeg's last error line, which may be another camera's thread's."""
    text = str(e).strip() or repr(e)
    return text.split("; last error log:")[0] if getattr(e, "log", None) else text


_THREADS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()  # every camera thread started, while it lives


def end_camera_threads(timeout: float = 2.0) -> int:
    """Before the process exits, once its cameras are stopped: make every FFmpeg call give up (interrupts.py) and
    wait up to `timeout` for the camera threads to end; returns how many are still running. A thread still inside
    FFmpeg when the interpreter is torn down has FFmpeg's interrupt callback call into a Python that is gone: the
    process could end in a segmentation fault (a SIGTERM while a camera was connecting)."""
    interrupts.interrupt_all()
    end = time.monotonic() + timeout
    for t in list(_THREADS):
        if t is not threading.current_thread():
            t.join(max(0.0, end - time.monotonic()))
    left = sum(t.is_alive() and t is not threading.current_thread() for t in list(_THREADS))
    if not left:
        interrupts.interrupt_all(False)  # none left to cut short: a server run again in this process reads as usual
    return left


class AvSource(Source):
    """An RTSP camera (or a video file) decoded by PyAV in its own thread, reconnected with backoff."""

    kind = "rtsp"
    watchdog = True

    def __init__(self, sink: FrameSink, url: str, options: RtspOptions, is_file: bool = False) -> None:
        super().__init__(sink)
        if not is_file:  # FFmpeg's protocol names are lower case: RTSP://cam is "protocol not found"
            scheme, sep, rest = url.partition("://")
            url = scheme.lower() + sep + rest
        self.url = url
        self.options = options
        self.is_file = is_file
        self.kind = "file" if is_file else "rtsp"
        self._gen = 0
        self._lock = threading.RLock()  # stop() may come from the sink while this thread reports a failure
        self._streaming = False
        self._hardware_failed = ""  # why hardware decoding was given up for this stream ('' while allowed)
        self._hardware_quiet_s = 0.0  # the latest quiet period on the CPU after a give-up (0: none yet, or reset)
        self._hardware_given_up_at = self._hardware_retry_at = 0.0  # the latest give-up, and when NVDEC may be
        # asked for again (self._clock)
        self._hardware_back_at: float | None = None  # when NVDEC decoded the stream's first frame since a give-up
        self._clock = now  # the retry schedule's clock (monotonic seconds; a test moves its own)
        self._transport = "tcp"  # RTSP's lower transport: UDP only for a camera that refuses TCP (_udp_instead)
        self._udp_warned = False  # the switch to UDP was logged as a warning (later switches: info)
        self._grew_to = 0  # pixels of a frame past ONE_DECODER_THREAD_UP_TO seen on a one-thread connection
        self.decoder = ""  # where the current connection decodes: 'cpu', 'nvdec', or '' before the first frame
        self._faults = FaultLog(log, "stream %s", (sink.stream_id,))  # a camera down for days: lines on change only

    def start(self) -> None:
        self._spawn()

    def stop(self) -> None:
        """Stop producing; under the lock the thread holds while it checks it is current and logs a failure, so no
        'reconnecting' line comes after the stream was removed."""
        with self._lock:
            super().stop()

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
        _THREADS.add(t)
        t.start()

    def _current(self, gen: int) -> bool:
        return gen == self._gen and not self.stopped

    def _av_options(self) -> dict[str, str]:
        if self.is_file:
            return {}
        return {
            "rtsp_transport": self._transport,
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
                if self._stream_once(gen, backoff):
                    continue  # reopen at once: NVDEC's quiet period is over, or the frames grew (info lines)
                if not self._current(gen):
                    break
                if self.is_file:
                    continue  # end of file: start again, like a camera that keeps sending
                raise ConnectionError("the server ended the stream")
            except _HardwareDecodeError:
                continue  # reopen at once, decoding on the CPU (warned when it was given up)
            except PermanentSourceError as e:
                if self._current(gen):
                    why = scrub_url(str(e), self.url)  # FFmpeg's errors quote the URL: no password leaves
                    log.error("stream %s failed: %s", self.sink.stream_id, why)
                    self.sink.set_state(StreamState.FAILED, why)
                return
            except Exception as e:
                if self._udp_instead(e):
                    continue  # connect again at once, over UDP
                self._transport = "tcp"  # the next connection asks for TCP first again: a refusal may have passed
                with self._lock:
                    if not self._current(gen):
                        break
                    self._streaming = False
                    msg = scrub_url(_describe(e), self.url)
                    self._faults.failed(msg, "; reconnecting")
                    self.sink.set_state(StreamState.RECONNECTING, msg)
                    self.sink.count_reconnect()
                self._stopped.wait(backoff.next_delay())

    def _udp_instead(self, e: BaseException) -> bool:
        """True (and UDP for this connection, until it fails) when the camera refused RTSP over TCP (461 Unsupported
        Transport: some cameras stream over UDP only, which would otherwise be retried over TCP forever). Never for
        rtsps://, which FFmpeg takes over TCP only (TLS)."""
        if (self.is_file or self._transport != "tcp" or self.url.startswith("rtsps:") or not isinstance(e, OSError)
                or e.errno != errno.EPROTONOSUPPORT):
            return False
        self._transport = "udp"
        log.log(logging.INFO if self._udp_warned else logging.WARNING, "stream %s: the camera refuses RTSP over "
                "TCP; receiving it over UDP (a packet lost on the network damages a frame)", self.sink.stream_id)
        self._udp_warned = True
        return True

    def _hwaccel(self) -> HWAccel | None:
        """The hardware acceleration for the next connection (None: decode on the CPU); once a give-up's quiet
        period is over, NVDEC is asked for again."""
        if self._hardware_failed:
            if not self._hardware_due():
                return None
            log.info("stream %s: trying NVDEC again after %s on the CPU", self.sink.stream_id,
                     _duration(self._clock() - self._hardware_given_up_at))
            self._hardware_failed = ""
        return hwaccel_for(self.options.decode, getattr(self.sink, "device", ""))

    def _hardware_due(self) -> bool:
        """Whether hardware decoding was given up and its quiet period is over (read at every frame on the CPU:
        an attribute read while it was never given up)."""
        return bool(self._hardware_failed) and self._clock() >= self._hardware_retry_at

    def _give_up_hardware(self, reason: str) -> None:
        """Decode on the CPU for a quiet period: the first one, or again after NVDEC ran as long as the latest one;
        else twice the latest (NVDEC failed again soon after it was tried: warned already, so an info line)."""
        t = self._clock()
        fresh = not self._hardware_quiet_s or (self._hardware_back_at is not None
                                               and t - self._hardware_back_at >= self._hardware_quiet_s)
        self._hardware_quiet_s = (NVDEC_RETRY_FIRST_S if fresh
                                  else min(2 * self._hardware_quiet_s, NVDEC_RETRY_MAX_S))
        wait = self._hardware_quiet_s * random.uniform(1.0, 1.0 + NVDEC_RETRY_JITTER)
        self._hardware_given_up_at, self._hardware_retry_at = t, t + wait
        self._hardware_back_at = None
        self._hardware_failed = reason
        log.log(logging.WARNING if fresh else logging.INFO, "stream %s: hardware decoding failed (%s); decoding "
                "this stream on the CPU; NVDEC tried again in %s", self.sink.stream_id, reason,
                _duration(wait))

    def _open(self, hwaccel: HWAccel | None) -> InputContainer:
        import av

        extra = {"hwaccel": hwaccel} if hwaccel is not None else {}  # PyAV < 14 has no such argument
        # the host checked again and pinned to an allowed address: no DNS rebinding past --allow-hosts
        url = self.url if self.is_file or self.options.hosts is None else self.options.hosts.pin(self.url)
        interrupts.install()  # its open and reads can be cut short at exit (end_camera_threads)
        with redirects.checked(None if self.is_file else self.options.hosts) as refused:
            try:
                container = av.open(url, options=self._av_options(),
                                    timeout=(self.options.open_timeout_s, self.options.read_timeout_s), **extra)
            except FileNotFoundError as e:
                if self.is_file:
                    raise PermanentSourceError(f"no such file: {self.url}") from e
                raise
            except Exception as e:
                if refused() is not None:  # interrupted at the redirect (or failed after it): said below
                    container = None
                elif isinstance(e, av.error.ExitError):  # PyAV's timeout interrupts FFmpeg; say what timed out
                    raise TimeoutError(f"no answer within {self.options.open_timeout_s:g} s while "
                                       "connecting") from None
                else:
                    raise
            if refused() is not None:
                if container is not None:
                    container.close()
                target, why = refused()
                raise PermanentSourceError(f"the camera redirected to {redact_url(target)}, which this server "
                                           f"refuses ({why}): not followed")
        return container

    def _open_with_fallback(self) -> tuple[InputContainer, bool]:
        """(container, hardware decoding asked for?): a source that opens without the GPU but not with it keeps
        going on the CPU."""
        hwaccel = self._hwaccel()
        try:
            container = self._open(hwaccel)
        except (PermanentSourceError, TimeoutError):
            raise
        except Exception as e:
            if hwaccel is None:
                raise
            container = self._open(None)  # the source is fine without the GPU: the hardware decoder was at fault
            self._give_up_hardware(scrub_url(f"opening the decoder: {_describe(e)}", self.url))
            return container, False
        return container, hwaccel is not None

    def _on_hardware(self, video: VideoStream, requested: bool) -> bool:
        """True when this connection's decoder runs on the GPU (its decoding errors are then the hardware's)."""
        return requested and video.codec_context.is_hwaccel

    def _note_decoder(self, video: VideoStream, frame: av.VideoFrame, requested: bool) -> None:
        """After a connection's first frame: record (and log when it changes) where this stream is decoded."""
        ctx = video.codec_context
        on_gpu = self._on_hardware(video, requested) and decoded_on_gpu(ctx, frame)  # else decoded in software
        decoder = "nvdec" if on_gpu else "cpu"
        if on_gpu and self._hardware_back_at is None:
            self._hardware_back_at = self._clock()  # a run on NVDEC this long resets the retry backoff
        if decoder != self.decoder:
            if on_gpu:
                log.info("stream %s: decoding on NVDEC (%s)", self.sink.stream_id,
                         getattr(self.sink, "device", "") or "GPU 0")
            elif requested:
                log.info("stream %s: decoding on the CPU: NVDEC does not take its video (%s, %s)",
                         self.sink.stream_id, ctx.name, ctx.format.name if ctx.format else "unknown format")
            self.sink.note_decoder(decoder)
        self.decoder = decoder

    def _frames(self, container: InputContainer, video: VideoStream, hardware: bool,
                gen: int) -> Iterator[av.VideoFrame]:
        """The video's decoded frames (demuxing and decoding apart, so that a packet the hardware decoder fails
        on is told from a failing source: it raises _HardwareDecodeError after giving up the hardware). A packet the
        decoder rejects as corrupt data (FFmpeg's bitstream parsing, the same on the GPU) is skipped, unless nothing
        has decoded for a whole read timeout since; any other decoding error on the GPU is the hardware's."""
        import av

        failing_since: float | None = None  # when the decoder began rejecting packets with no frame since
        skipped = 0
        for packet in container.demux(video):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as e:
                t = now()
                failing_since = t if failing_since is None else failing_since
                corrupt = isinstance(e, av.error.InvalidDataError)
                if hardware and (not corrupt or t - failing_since > self.options.read_timeout_s):
                    self._give_up_hardware(scrub_url(f"decoding: {_describe(e)}", self.url))
                    raise _HardwareDecodeError(_own_text(e)) from e
                if not corrupt or t - failing_since > self.options.read_timeout_s:
                    raise  # not corrupt data, or nothing decodable for a whole read timeout: reconnect
                skipped += 1
                self._skip_corrupt(e, skipped, gen)
                continue
            if frames:
                failing_since = None
            yield from frames

    def _skip_corrupt(self, e: BaseException, skipped: int, gen: int) -> None:
        """A packet the decoder rejected as corrupt (a lost or damaged NAL unit) is skipped, not reconnected for:
        the decoder picks up again at the next slice or keyframe, where a new connection would wait for a keyframe.
        Logged once per connection, not while the camera is failing to stream (a camera that sends nothing else:
        the connection's end says it); while streaming, the count is the stream's last error (ListStreams)."""
        why = scrub_url(f"{skipped} corrupt video packet{'s' if skipped > 1 else ''} skipped on this connection "
                        f"({_describe(e)})", self.url)
        if skipped == 1 and not self._faults.failing:
            log.warning("stream %s: %s", self.sink.stream_id, why)
        self.sink.count_corrupt()
        with self._lock:
            if self._streaming and self._current(gen):
                self.sink.set_state(StreamState.STREAMING, why)

    def _stream_once(self, gen: int, backoff: Backoff) -> bool:
        """One connection's frames to the sink, until it ends (False) or it is to be reopened at once (True: NVDEC to
        be tried again, or frames grown past what one decoder thread is for)."""
        import av

        container, requested = self._open_with_fallback()
        try:
            if not container.streams.video:
                raise PermanentSourceError(f"{redact_url(self.url)} has no video track")
            video = container.streams.video[0]
            hardware = self._on_hardware(video, requested)
            video.thread_type = "SLICE"  # slice threads add no latency; frame threads would buffer frames
            # one thread only for a size known to be small (threads cannot be added once the decoder is open), and
            # never again once larger frames came: a camera may keep announcing its old size
            known = max(video.codec_context.width * video.codec_context.height, self._grew_to)
            one_thread = 0 < known <= ONE_DECODER_THREAD_UP_TO
            if one_thread:
                video.codec_context.thread_count = 1
            min_gap = 1.0 / self.sink.max_fps if self.sink.max_fps > 0 else 0.0
            last_emit = -1e9
            pacer = _FilePacer() if self.is_file else None
            first = True
            try:
                while True:
                    for frame in self._frames(container, video, hardware, gen):
                        if not self._current(gen):
                            return False
                        if self._hardware_due():
                            return True  # on the CPU since a give-up whose quiet period is over
                        if first:
                            first = False
                            self._note_decoder(video, frame, requested)
                        t = now()
                        self.last_frame_at = t
                        if not self._streaming:
                            with self._lock:
                                if not self._current(gen):
                                    return False
                                self._streaming = True
                                self.sink.set_state(StreamState.STREAMING)
                            backoff.reset()
                        self._faults.ok("streaming again")  # each frame: a flapping camera that stays up is said
                        if pacer is not None and frame.time is not None:  # pace files at their own rate
                            wait = pacer.wait(frame.time, t)
                            if wait > 0:
                                self._stopped.wait(wait)
                                t = now()
                        if min_gap and t - last_emit < min_gap * 0.95:
                            continue
                        last_emit = t
                        if not self.sink.admit(t):
                            continue  # overloaded: this camera's turn comes with a later frame
                        if one_thread and frame.width * frame.height > ONE_DECODER_THREAD_UP_TO:
                            self._grown(frame)
                            return True
                        lb = self.sink.plan((frame.height, frame.width))
                        # deferred: newest-wins drops most frames of a busy camera before they reach an engine
                        self.sink.put(functools.partial(letterbox_avframe, frame, lb), lb, time.time_ns() // 1000)
                    if pacer is None or not self._current(gen) or not self._rewind(container):
                        return False  # a camera that ended, or a file that cannot seek (the caller reopens it)
                    pacer.rewind()
            except av.error.DecoderNotFoundError as e:
                raise PermanentSourceError(f"no decoder for {redact_url(self.url)}'s video: {_own_text(e)}") from e
            except av.error.ExitError:
                raise TimeoutError(f"no data for {self.options.read_timeout_s:g} s") from None
        finally:
            container.close()

    def _grown(self, frame: av.VideoFrame) -> None:
        """The camera's frames grew past ONE_DECODER_THREAD_UP_TO on a connection decoding in one thread (an
        operator changed its resolution): remembered, so that this and every later connection decodes with slice
        threads (a 4K frame took 13-16 ms in one thread here, 8-10 with them); the caller reconnects at once."""
        self._grew_to = frame.width * frame.height
        log.info("stream %s: its frames are %dx%d now: reconnecting to decode them with more threads",
                 self.sink.stream_id, frame.width, frame.height)

    @staticmethod
    def _rewind(container: InputContainer) -> bool:
        """Seek a file back to its start (decoder flushed, same connection); False when it cannot seek."""
        import av

        try:
            container.seek(0)
        except (av.error.FFmpegError, OSError):
            return False
        return True


class _FilePacer:
    """Real-time pacing of a file's frames by their timestamps, without a gap or a jump where it loops."""

    def __init__(self) -> None:
        self.start: float | None = None  # wall time of the first frame
        self.first = 0.0  # its media time
        self.offset = 0.0  # media seconds played in earlier loops
        self.last = 0.0  # media time of the latest frame
        self.step = 0.04  # latest frame interval (the pause between a loop's last frame and the next first)

    def wait(self, media_time: float, t: float) -> float:
        """Seconds until the frame at `media_time` is due, at wall time `t`."""
        if self.start is None:
            self.start, self.first, self.last = t, media_time, media_time
        if 0 < media_time - self.last < 1.0:
            self.step = media_time - self.last
        self.last = media_time
        return self.offset + (media_time - self.first) - (t - self.start)

    def rewind(self) -> None:
        """The file starts again: its next frames follow the last one by one frame interval."""
        self.offset += self.last - self.first + self.step
        self.last = self.first
