"""Where pulled video is decoded (`--decode cpu|nvdec|auto`) and how video files play as cameras.

On a machine without NVDEC (CI) the hardware paths are exercised for real as far as they go: PyAV is asked for
the CUDA device and fails, and the stream must fall back to CPU decoding with one warning and keep serving.
Where NVDEC works, the same tests expect it to be used instead.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_server_harness import ServerProcess, wait_until

from yolov12_serve.cli import build_parser, parse_config
from yolov12_serve.config import DECODE_MODES, RtspOptions
from yolov12_serve.errors import ConfigError
from yolov12_serve.preprocess import InputPlanner
from yolov12_serve.sources import hwdecode
from yolov12_serve.sources.base import StreamState
from yolov12_serve.sources.rtsp import AvSource

pytestmark = pytest.mark.timeout(60)

NVDEC = hwdecode.nvdec_problem(0) is None  # a GPU with NVDEC is visible to FFmpeg here


def write_clip(path: Path, frames: int = 25, fps: int = 25, size: tuple[int, int] = (180, 320),
               codec: str = "libx264", corrupt: int | None = None) -> Path:
    """A short clip of moving gradients; `corrupt`: that frame's packet is replaced by garbage bytes."""
    import av

    h, w = size
    pix = {"libx264": "yuv420p", "mjpeg": "yuvj420p"}[codec]
    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, pix
        ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
        for i in range(frames):
            img = ((ramp + i * 8) % 256).astype(np.uint8).repeat(h, 0).repeat(3, 2)
            for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                if packet.pts is not None and i == corrupt:
                    bad = av.Packet(b"\x00" * 64)
                    bad.stream, bad.pts, bad.dts, bad.time_base = s, packet.pts, packet.dts, packet.time_base
                    packet = bad
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)
    return path


class Sink:
    """A stream stand-in that keeps what a source hands it (the source is what is tested)."""

    def __init__(self, device: str = "cpu", imgsz: int = 320) -> None:
        self.stream_id, self.max_fps, self.device = "cam", 0.0, device
        self.planner = InputPlanner((imgsz, imgsz))
        self.times: list[float] = []
        self.shapes: set[tuple[int, ...]] = set()
        self.states: list[tuple[StreamState, str]] = []
        self.reconnects = 0
        self.corrupt = 0
        self.decoders: list[str] = []
        self.admitting = True  # what the stream would say under overload (Stream.admit): False sheds every frame
        self.shed = 0
        self.ahead = 0  # what shed_ahead says: the next frames that would be shed too
        self.skipped = 0
        self._lock = threading.Lock()

    def admit(self, t: float) -> bool:
        if not self.admitting:
            self.shed += 1
        return self.admitting

    def shed_ahead(self, period: float) -> int:
        self.skipped += self.ahead
        return self.ahead

    def plan(self, src_hw):
        return self.planner.plan(src_hw)

    def put(self, image, letterbox, capture_time_us) -> None:
        handed = time.monotonic()  # when the source let the frame go (its pacing), not when the letterbox ended
        image = image() if callable(image) else image  # cameras defer the letterbox: run it, as a worker would
        with self._lock:
            self.times.append(handed)
            self.shapes.add(image.shape)

    def set_state(self, state, error: str = "") -> None:
        self.states.append((state, error))

    def count_reconnect(self) -> None:
        self.reconnects += 1

    def count_corrupt(self) -> None:
        self.corrupt += 1

    def note_decoder(self, decoder: str) -> None:
        self.decoders.append(decoder)


def run_source(source: AvSource, seconds: float) -> None:
    source.start()
    try:
        time.sleep(seconds)
    finally:
        source.stop()
        time.sleep(0.1)


@pytest.fixture
def fresh_log_once(monkeypatch):
    """Forget which one-time messages hwdecode already logged in this process."""
    monkeypatch.setattr(hwdecode, "_logged", set())


# ------------------------------------------------------------------------------------------------ option plumbing
def test_decode_option_reaches_the_source_options():
    parser = build_parser()
    config, _ = parse_config(parser.parse_args(["--engines", "m.onnx", "--gpus", "cpu"]))
    assert config.rtsp.decode == "cpu"  # the default: nothing changes for existing deployments
    for mode in DECODE_MODES:
        config, _ = parse_config(parser.parse_args(["--engines", "m.onnx", "--gpus", "cpu", "--decode", mode]))
        assert config.rtsp.decode == mode


def test_unknown_decode_mode_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--decode", "gpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'gpu'" in err and "'nvdec'" in err
    with pytest.raises(ConfigError, match="use one of cpu, nvdec, auto"):
        RtspOptions(decode="gpu")


def test_gpu_index_of_device_names():
    assert hwdecode.gpu_index("cuda:3") == 3
    assert hwdecode.gpu_index("cuda") == 0
    assert hwdecode.gpu_index("cpu") is None
    assert hwdecode.gpu_index("") is None


def test_cpu_and_auto_on_cpu_devices_never_touch_the_gpu(fresh_log_once, caplog):
    caplog.set_level(logging.INFO, "yolov12_serve")
    assert hwdecode.hwaccel_for("cpu", "cuda:0") is None
    assert hwdecode.hwaccel_for("auto", "cpu") is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with pytest.raises(ValueError, match="decode mode"):
        hwdecode.hwaccel_for("gpu", "cpu")


def test_nvdec_without_a_usable_gpu_decodes_on_the_cpu_and_warns_once(fresh_log_once, caplog):
    caplog.set_level(logging.INFO, "yolov12_serve")
    results = [hwdecode.hwaccel_for("nvdec", "cuda:0") for _ in range(3)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if NVDEC:
        assert all(r is not None for r in results) and not warnings
        return
    assert results == [None, None, None]
    assert len(warnings) == 1 and "decoding on the CPU" in warnings[0], warnings
    assert hwdecode.nvdec_problem(0) in warnings[0]  # the reason is given
    assert hwdecode.hwaccel_for("auto", "cuda:0") is None  # auto falls back quietly (logged at INFO)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_cuda_context_errors_name_the_call():
    """The primary context is reached through libcuda alone; without a driver (or GPU) the error says so."""
    import ctypes

    from yolov12_serve.sources.cudactx import CudaDriverError, make_current

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        with pytest.raises(CudaDriverError, match="no CUDA driver"):
            make_current(0)
        return
    with pytest.raises(CudaDriverError, match=r"cuDeviceGet\(999\) failed: CUDA_ERROR_INVALID_DEVICE"):
        make_current(999)


def test_gpu_decoded_frames_are_told_from_software_ones():
    """The probe's test stream decodes in software here; its planar frames must not pass for NVDEC's NV12."""
    import io

    import av

    with av.open(io.BytesIO(hwdecode._tiny_h264()), format="h264") as c:
        video = c.streams.video[0]
        frames = list(c.decode(video))
    assert len(frames) == 3
    assert not hwdecode.decoded_on_gpu(video.codec_context, frames[0])
    assert hwdecode.decoded_on_gpu(video.codec_context, frames[0].reformat(format="nv12"))  # what NVDEC hands back


# ------------------------------------------------------------------------------------------------ fallback
def test_nvdec_stream_serves_frames_decoded_where_the_machine_allows(tmp_path, fresh_log_once, caplog):
    caplog.set_level(logging.INFO, "yolov12_serve")
    clip = write_clip(tmp_path / "clip.mp4")
    sink = Sink(device="cuda:0")
    source = AvSource(sink, str(clip), RtspOptions(decode="nvdec"), is_file=True)
    run_source(source, 1.0)
    assert len(sink.times) >= 15, "frames must keep flowing whatever the decoder"
    assert sink.shapes == {(192, 320, 3)}  # letterboxed exactly as with CPU decoding
    assert source.decoder == ("nvdec" if NVDEC else "cpu")
    assert sink.states[0][0] == StreamState.STREAMING and sink.reconnects == 0


def test_hardware_decoder_that_will_not_open_falls_back_to_the_cpu_with_one_warning(tmp_path, monkeypatch, caplog):
    """Skip the process-wide NVDEC check and hand the source a real CUDA HWAccel: without a GPU, PyAV fails to
    open the decoder; the source must reopen the same file on the CPU, warn once, and not count a reconnect."""
    from av.codec.hwaccel import HWAccel

    from yolov12_serve.sources import rtsp

    caplog.set_level(logging.INFO, "yolov12_serve")
    monkeypatch.setattr(rtsp, "hwaccel_for", lambda mode, device: HWAccel("cuda", allow_software_fallback=True))
    clip = write_clip(tmp_path / "clip.mp4", frames=10)
    sink = Sink(device="cuda:0")
    source = AvSource(sink, str(clip), RtspOptions(decode="nvdec"), is_file=True)
    run_source(source, 1.2)  # the 10-frame clip loops about three times: one warning, not one per loop
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(sink.times) >= 20
    assert sink.reconnects == 0 and all(s == StreamState.STREAMING for s, _ in sink.states)
    if NVDEC:
        assert source.decoder == "nvdec" and not warnings
    else:
        assert source.decoder == "cpu"
        assert len(warnings) == 1 and "hardware decoding failed (opening the decoder" in warnings[0], warnings


class _CorruptedHardware(AvSource):
    """A source whose software decoder is declared 'hardware' until given up: what it does with a packet the
    decoder rejects is then what a GPU decoder's stream would do (what cannot be broken on purpose on a real GPU)."""

    def _on_hardware(self, video, requested: bool) -> bool:
        return not self._hardware_failed


class _FailingHardware(_CorruptedHardware):
    """Also fails its 7th packet as NVDEC fails a picture (FFmpeg: AVERROR_EXTERNAL from cuvidDecodePicture)."""

    def _open(self, hwaccel):
        container = super()._open(hwaccel)
        return container if self._hardware_failed else _FailsAt(container, 6)


class _FailsAt:
    def __init__(self, container, index: int) -> None:
        self._container, self._index = container, index

    def __getattr__(self, name):
        return getattr(self._container, name)

    def demux(self, *streams):
        import av

        for i, packet in enumerate(self._container.demux(*streams)):
            if i != self._index:
                yield packet
                continue

            class Failing:
                def decode(self):
                    raise av.error.ExternalError(-542398533, "Generic error in an external library")
            yield Failing()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name == "yolov12_serve.sources.rtsp"]


def test_a_corrupt_packet_on_the_hardware_decoder_is_skipped_and_the_stream_stays_there(tmp_path, caplog):
    """A damaged packet (InvalidDataError: FFmpeg's bitstream parsing, the same on NVDEC) used to move the stream
    to the CPU for good, at the first damaged packet of a camera on a lossy link. Now skipped as on the CPU."""
    caplog.set_level(logging.INFO, "yolov12_serve")
    clip = write_clip(tmp_path / "bad.avi", frames=12, codec="mjpeg", corrupt=6)
    sink = Sink()
    source = _CorruptedHardware(sink, str(clip), RtspOptions(decode="nvdec", backoff_base_s=0.05, backoff_cap_s=0.05),
                                is_file=True)
    run_source(source, 1.5)
    warnings = _warnings(caplog)
    assert not source._hardware_failed and not [w for w in warnings if "hardware decoding failed" in w], warnings
    # skipped on its connection (each loop of the file is one): no reconnect, the count in the last error
    assert warnings and all("1 corrupt video packet skipped on this connection (InvalidDataError" in w
                            for w in warnings), warnings
    assert sink.reconnects == 0 and not [s for s, _ in sink.states if s == StreamState.RECONNECTING]
    assert sink.corrupt >= 1  # each skipped packet counted (FrameSink.count_corrupt)
    assert any("corrupt video packet skipped" in e for s, e in sink.states if s == StreamState.STREAMING)
    assert len(sink.times) >= 12  # frames on both sides of the bad one, again and again


def test_packet_failing_in_the_hardware_decoder_moves_the_stream_to_the_cpu(tmp_path, caplog):
    caplog.set_level(logging.INFO, "yolov12_serve")
    clip = write_clip(tmp_path / "good.avi", frames=12, codec="mjpeg")
    sink = Sink()
    source = _FailingHardware(sink, str(clip), RtspOptions(decode="nvdec", backoff_base_s=0.05, backoff_cap_s=0.05),
                              is_file=True)
    run_source(source, 1.5)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "hardware decoding failed (decoding: ExternalError" in warnings[0], warnings
    assert source.decoder == "cpu" and source._hardware_failed  # once, then on the CPU for its quiet period
    assert sink.reconnects == 0 and not [s for s, _ in sink.states if s == StreamState.RECONNECTING]
    assert len(sink.times) >= 18  # the hardware's 6 frames, then the CPU's, reopened at once and looping


class _RetriedHardware(AvSource):
    """A source told NVDEC is there (hwaccel_for patched) whose 'hardware' connections decode in software declared
    hardware; while `failing`, their 7th packet fails as NVDEC fails a picture. `asked` records, per connect, whether
    NVDEC was asked for; the retry schedule runs on the clock `t`, which the test moves (no sleeping minutes)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.asked: list[bool] = []
        self.failing = True
        self.t = 0.0
        self._clock = lambda: self.t

    def _open(self, hwaccel):
        container = super()._open(None)
        self.asked.append(hwaccel is not None)
        return _FailsAt(container, 6) if hwaccel is not None and self.failing else container

    def _on_hardware(self, video, requested: bool) -> bool:
        return requested


@pytest.fixture
def retried(tmp_path, monkeypatch, caplog):
    """A started _RetriedHardware file camera (stopped after the test) whose hardware frames count as NVDEC's."""
    from yolov12_serve.sources import rtsp

    caplog.set_level(logging.INFO, "yolov12_serve")
    monkeypatch.setattr(rtsp, "hwaccel_for", lambda mode, device: object())
    monkeypatch.setattr(rtsp, "decoded_on_gpu", lambda ctx, frame: True)
    clip = write_clip(tmp_path / "good.avi", frames=12, codec="mjpeg")
    source = _RetriedHardware(Sink(device="cuda:0"), str(clip), RtspOptions(decode="nvdec"), is_file=True)
    source.start()
    yield source
    source.stop()


def _connects(source: _RetriedHardware, n: int, decoder: str) -> None:
    """Wait for the source's n-th connect and then for frames there decoded by `decoder`."""
    wait_until(lambda: len(source.asked) >= n, 10, 0.01, what=f"connect {n} (asked: {source.asked})")
    wait_until(lambda: source.decoder == decoder, 10, 0.01, what=f"decoding on {decoder}")
    _frames(source, 3)
    assert len(source.asked) == n, source.asked


def _frames(source: AvSource, n: int) -> None:
    """Wait for n more frames (each one checked the retry schedule before it was handed over)."""
    start = len(source.sink.times)
    wait_until(lambda: len(source.sink.times) >= start + n, 10, 0.01, what=f"{n} more frames")


def _given_up(caplog) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if "hardware decoding failed" in r.getMessage()]


FIRST, JITTER = 600.0, 1.2  # rtsp.NVDEC_RETRY_FIRST_S and the longest draw of a wait: checked below


def test_nvdec_given_up_is_asked_for_again_after_its_quiet_period_only(retried, caplog):
    """A give-up keeps the stream on the CPU for a quiet period, at each connect meanwhile (a watchdog restart
    here); once it is over, the stream streaming on the CPU reconnects asking for NVDEC, and decodes there again
    (the decoder it reports follows), with one info line and no reconnect counted."""
    from yolov12_serve.sources import rtsp

    assert (rtsp.NVDEC_RETRY_FIRST_S, 1 + rtsp.NVDEC_RETRY_JITTER) == (FIRST, JITTER)
    _connects(retried, 2, "cpu")  # NVDEC asked for, failed at its 7th packet; reopened on the CPU
    assert retried.asked == [True, False]
    (level, msg), = _given_up(caplog)
    assert level == logging.WARNING and re.search(r"decoding this stream on the CPU; NVDEC tried again in 1[0-2] min$",
                                                  msg), msg
    retried.t = FIRST - 1
    retried.restart("stalled")  # a connect that happens anyway, within the quiet period: on the CPU
    _connects(retried, 3, "cpu")
    retried.failing = False
    retried.t = FIRST * JITTER + 1  # the quiet period is over: the streaming connection is replaced at once
    _connects(retried, 4, "nvdec")
    assert retried.asked == [True, False, False, True]
    decoders = retried.sink.decoders  # what ListStreams shows, told on each change only
    assert decoders[-2:] == ["cpu", "nvdec"] and all(a != b for a, b in itertools.pairwise(decoders)), decoders
    tried = [r for r in caplog.records if "trying NVDEC again" in r.getMessage()]
    assert len(tried) == 1 and tried[0].levelno == logging.INFO, [r.getMessage() for r in tried]
    assert retried.sink.reconnects == 1  # the watchdog's restart only
    assert [s for s, _ in retried.sink.states if s == StreamState.RECONNECTING] == [StreamState.RECONNECTING]
    assert len(_given_up(caplog)) == 1


def test_nvdec_failing_again_soon_after_its_retry_doubles_the_quiet_period(retried, caplog):
    """NVDEC that fails again right after it was tried waits twice as long (an info line: warned already)."""
    _connects(retried, 2, "cpu")
    retried.t = FIRST * JITTER + 1
    _connects(retried, 4, "cpu")  # tried, failed again at its 7th packet, reopened on the CPU
    assert retried.asked == [True, False, True, False]
    _, (level, second) = _given_up(caplog)
    assert level == logging.INFO and re.search(r"NVDEC tried again in 2[0-4] min$", second), second
    given_up_at = retried.t
    retried.t = given_up_at + FIRST * JITTER + 1  # the first period would be over: still on the CPU
    _frames(retried, 5)
    assert retried.asked == [True, False, True, False]
    retried.failing = False
    retried.t = given_up_at + 2 * FIRST * JITTER + 1
    _connects(retried, 5, "nvdec")
    assert retried.asked[-1] is True


@pytest.mark.parametrize(("good_run", "next_wait"), [(FIRST, "1[0-2] min"), (FIRST / 2, "2[0-4] min")])
def test_a_long_enough_run_on_nvdec_resets_the_quiet_period(retried, caplog, good_run, next_wait):
    """After NVDEC decoded the stream for as long as the latest quiet period, a give-up starts the backoff again
    (the first period, warned); after a shorter run the period doubles."""
    _connects(retried, 2, "cpu")
    retried.failing = False
    retried.t = back = FIRST * JITTER + 1
    _connects(retried, 3, "nvdec")
    retried.failing = True
    retried.t = back + good_run
    retried.restart("stalled")  # the camera reconnects; NVDEC fails on the new connection
    _connects(retried, 5, "cpu")
    assert retried.asked == [True, False, True, True, False]
    (level, msg) = _given_up(caplog)[-1]
    assert re.search(f"NVDEC tried again in {next_wait}$", msg), msg
    assert level == (logging.WARNING if good_run == FIRST else logging.INFO)


def test_the_quiet_period_doubles_up_to_its_cap(caplog):
    """Give-ups that each follow a retry failing at once: 10, 20, 40, 80, 160 min, then 4 h each time."""
    from yolov12_serve.sources import rtsp

    caplog.set_level(logging.INFO, "yolov12_serve")
    source = AvSource(Sink(device="cuda:0"), "rtsp://cam/x", RtspOptions(decode="nvdec"))
    t = [0.0]
    source._clock = lambda: t[0]
    waits = []
    for _ in range(8):
        source._give_up_hardware("decoding: ExternalError")
        waits.append(source._hardware_retry_at - t[0])
        t[0] = source._hardware_retry_at
    periods = [60 * m for m in (10, 20, 40, 80, 160)] + [rtsp.NVDEC_RETRY_MAX_S] * 3
    assert all(p <= w <= p * JITTER for w, p in zip(waits, periods, strict=True)), waits
    assert all(" h" in m for _, m in _given_up(caplog)[5:])


# ------------------------------------------------------------------------------------------------ files as cameras
def test_file_plays_in_real_time_and_loops(tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", frames=20, fps=25)  # 0.8 s
    sink = Sink()
    source = AvSource(sink, str(clip), RtspOptions(), is_file=True)
    run_source(source, 2.0)
    n = len(sink.times)
    assert n > 30, f"{n} frames in 2 s from a 20-frame clip: it must loop"
    assert n <= 2.0 * 25 + 3, f"{n} frames in 2 s: a 25 fps file must be paced, not decoded flat out"
    gaps = np.diff(sink.times)
    assert np.median(gaps) == pytest.approx(0.04, abs=0.012)
    # one schedule across loops: frame k is due k/25 s after the first, the loop's seams included (no reopen gap,
    # no early restart). Compared by the median lag behind that schedule in the first and the last loop, so that
    # one frame a busy machine hands over late (the first or the last, say) does not decide it
    lag = np.asarray(sink.times) - sink.times[0] - np.arange(n) / 25
    first_loop, last_loop = np.median(lag[:20]), np.median(lag[(n - 1) // 20 * 20:])
    assert last_loop - first_loop == pytest.approx(0, abs=0.02), (first_loop, last_loop)


def test_a_camera_sheds_the_frames_its_stream_does_not_admit_and_stays_alive(tmp_path):
    """Past capacity a stream sheds a camera's frames at the source (Stream.admit): a file camera and a synthetic
    one hand over none of them, yet every frame still counts as arrived (the stall watchdog must not restart
    a camera that only sheds)."""
    from yolov12_serve.frames import now
    from yolov12_serve.sources.synthetic import SyntheticSource

    clip = write_clip(tmp_path / "clip.mp4", frames=20, fps=25)
    sinks = [Sink(), Sink()]
    sources = [AvSource(sinks[0], str(clip), RtspOptions(), is_file=True),
               SyntheticSource(sinks[1], "synthetic://cam?fps=25&size=64x64")]
    for sink in sinks:
        sink.admitting = False
    for source in sources:
        source.start()
    try:
        time.sleep(1.5)
        for source, sink in zip(sources, sinks, strict=True):
            assert sink.times == [] and sink.shed >= 20, (source.kind, sink.shed)
            assert now() - source.last_frame_at < 0.2, source.kind
    finally:
        for source in sources:
            source.stop()


def test_a_synthetic_camera_does_not_tick_for_the_frames_its_stream_will_shed_anyway():
    """Past capacity a synthetic camera skips the frames the stream says will be shed too (Stream.shed_ahead): told
    that the next 4 would be, it asks about one frame in 5 and the others count as shed, none lost from the offered
    load."""
    from yolov12_serve.sources.synthetic import SyntheticSource

    sink = Sink()
    sink.admitting, sink.ahead = False, 4
    source = SyntheticSource(sink, "synthetic://cam?fps=25&size=64x64")
    run_source(source, 2.0)
    offered = sink.shed + sink.skipped
    assert 35 <= offered <= 55, (sink.shed, sink.skipped)  # ~2 s at 25 fps, after the strip is rendered
    assert sink.skipped == 4 * sink.shed and 7 <= sink.shed <= 11, (sink.shed, sink.skipped)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts the process's threads in Linux's /proc")
def test_a_camera_up_to_1080p_is_decoded_in_its_own_thread_only(tmp_path):
    """FFmpeg's slice threads woke two more threads per frame, preempting engine runs on few cores (rtsp.py)."""
    clip = write_clip(tmp_path / "clip.mp4", frames=20, fps=25)

    def threads() -> set[int]:
        return {int(t) for t in os.listdir("/proc/self/task")}

    before = threads()
    sink = Sink()
    source = AvSource(sink, str(clip), RtspOptions(), is_file=True)
    source.start()
    try:
        deadline = time.monotonic() + 10
        while len(sink.times) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(sink.times) >= 5
        started = threads() - before
    finally:
        source.stop()
    assert len(started) == 1, f"{len(started)} threads for one camera: its own and {len(started) - 1} decoder threads"


def test_server_with_nvdec_serves_a_file_camera_on_any_machine(tmp_path):
    """The real server (torch blocked) with --decode nvdec and two file cameras: detections flow; on a machine
    without NVDEC the log says so once, not once per stream."""
    clip = write_clip(tmp_path / "clip.mp4", frames=25)
    server = ServerProcess("--allow-files", "--decode", "nvdec", "--source", str(clip), "--source", str(clip))
    try:
        with server.client() as client:
            client.wait_ready(60)
            wait_until(lambda: all(s.frames_processed > 5 for s in client.list_streams()), 30,
                       what="both file cameras served")
            assert {s.width for s in client.list_streams()} == {320}
        log = server.log()
        if not NVDEC:
            assert log.count("--decode nvdec: NVDEC unavailable") == 1, log[-3000:]
        assert "Traceback" not in log
    finally:
        rc, _ = server.terminate()
    assert rc == 0


def test_synthetic_cameras_started_together_keep_phases_of_their_own():
    """Real cameras are not synchronised; demo cameras added at once must not all tick at once (bursts of frames
    that no deadline scheduler can serve on time). Each keeps the phase its name and seed give it."""
    import random

    from yolov12_serve.frames import now
    from yolov12_serve.sources.synthetic import SyntheticSource

    fps = 20.0
    sinks, sources = {}, []
    for name in ("left", "right"):
        sink = Sink()
        sink.put = lambda image, letterbox, capture_time_us, times=sink.times: times.append(now())
        sinks[name] = sink
        sources.append(SyntheticSource(sink, f"synthetic://{name}?fps={fps:g}&size=64x64&seed=3"))
    for s in sources:
        s.start()
    time.sleep(1.5)
    for s in sources:
        s.stop()
    phase = {n: float(np.median([(t * fps) % 1.0 for t in sink.times[2:]])) for n, sink in sinks.items()}
    expected = {n: random.Random(f"{n}:3").random() for n in sinks}
    assert all(len(sink.times) >= 20 for sink in sinks.values())
    for n in sinks:
        gap = abs(phase[n] - expected[n]) % 1.0
        assert min(gap, 1.0 - gap) < 0.1, (phase, expected)


def test_synthetic_frames_are_the_strips_window_fitted_with_or_without_a_resize():
    """A demo camera's frame is the window of its belt strip at that tick, letterboxed: padded from a view of the
    strip array where the engine takes the frame's size (320x180 at 320), resized through Pillow otherwise."""
    from PIL import Image

    from yolov12_serve.preprocess import letterbox_image
    from yolov12_serve.sources.synthetic import SyntheticSource, parse_synthetic_url, render_strip

    for size, imgsz in (("320x180", 320), ("640x360", 320)):
        url = f"synthetic://belt?fps=50&size={size}&seed=4&speed=7"
        sink, frames = Sink(imgsz=imgsz), []
        sink.put = lambda image, letterbox, capture_time_us, frames=frames: frames.append((image(), letterbox))
        source = SyntheticSource(sink, url)
        source.start()
        deadline = time.monotonic() + 10
        while len(frames) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        source.stop()
        cam = parse_synthetic_url(url)
        picture = Image.fromarray(render_strip(cam))
        (h, w), period = cam.size, picture.size[0] - cam.size[1]
        assert len(frames) >= 3
        for tick, (image, lb) in enumerate(frames[:3]):
            x = (tick * cam.speed) % period
            assert image.shape == (*lb.input_hw, 3)
            np.testing.assert_array_equal(image, letterbox_image(picture, lb, (x, 0, x + w, h)))


def test_a_synthetic_camera_moved_to_an_engine_of_another_size_keeps_serving_its_windows():
    """A demo camera keeps one form of its strip (array to pad from, or picture to resize); a stream moved to an
    engine of another input size converts it once and goes on handing over the strip's windows."""
    from PIL import Image

    from yolov12_serve.preprocess import InputPlanner, letterbox_image
    from yolov12_serve.sources.synthetic import SyntheticSource, parse_synthetic_url, render_strip

    url = "synthetic://moved?fps=40&size=320x180&seed=2&speed=5"
    sink, frames = Sink(imgsz=320), []
    sink.put = lambda image, letterbox, capture_time_us: frames.append((image(), letterbox))
    source = SyntheticSource(sink, url)
    source.start()
    try:
        for imgsz, count in ((320, 3), (640, 6), (320, 9)):  # pad only, then a resize, then pad only again
            sink.planner = InputPlanner((imgsz, imgsz))
            deadline = time.monotonic() + 10
            while len(frames) < count and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        source.stop()
    cam = parse_synthetic_url(url)
    picture = Image.fromarray(render_strip(cam))
    (h, w), period = cam.size, picture.size[0] - cam.size[1]
    shapes = {lb.new_hw for _, lb in frames}
    assert len(frames) >= 9 and shapes == {(180, 320), (360, 640)}, shapes
    for image, lb in frames:
        windows = (letterbox_image(picture, lb, (x, 0, x + w, h)) for x in range(0, period, cam.speed))
        assert any(np.array_equal(image, want) for want in windows), lb


def test_camera_threads_inside_ffmpeg_are_ended_before_the_process_exits():
    """A camera that accepts the connection and never answers holds its thread inside FFmpeg's open for the open
    timeout (5 s). A server exiting meanwhile tore the interpreter down under it, and FFmpeg's interrupt callback
    could then crash the process (a segmentation fault at SIGTERM). `end_camera_threads` has every
    FFmpeg call give up and waits: the thread is gone well before its open would have timed out."""
    import socket

    from yolov12_serve.sources.rtsp import end_camera_threads

    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(silent.accept()[0]), daemon=True).start()
    sink = Sink()
    source = AvSource(sink, f"rtsp://127.0.0.1:{silent.getsockname()[1]}/x", RtspOptions(open_timeout_s=5.0))
    try:
        source.start()
        deadline = time.monotonic() + 5
        while not held and time.monotonic() < deadline:
            time.sleep(0.05)
        assert held, "the camera did not connect"
        time.sleep(0.3)  # inside avformat_open_input, waiting for an answer
        source.stop()
        t0 = time.monotonic()
        left = end_camera_threads(timeout=3.0)
        took = time.monotonic() - t0
    finally:
        silent.close()
        for conn in held:
            conn.close()
    assert left == 0 and took < 2.0, f"{left} camera threads left after {took:.1f} s"
    assert not any(t.name.startswith("source-cam") and t.is_alive() for t in threading.enumerate())


def test_a_camera_s_error_text_leaves_out_ffmpeg_s_last_log_line():
    """With FFmpeg's log on (the server reads it for redirects), PyAV appends the last error line logged by any
    thread to an error's text: another camera's, maybe. A camera's last_error keeps its own error only."""
    import av

    from yolov12_serve.sources.rtsp import _describe

    e = av.error.InvalidDataError(1094995529, "Invalid data found when processing input", "rtsp://op:pw@cam/x",
                                  (16, "rtsp", "method DESCRIBE failed: 404 Not Found (rtsp://other/camera)"))
    assert "last error log" in str(e)
    assert _describe(e) == ("InvalidDataError: [Errno 1094995529] Invalid data found when processing input: "
                            "'rtsp://op:***@cam/x'")


class _RefusesTcp(AvSource):
    """A camera that answers SETUP over TCP with 461 (FFmpeg: EPROTONOSUPPORT) and whose UDP connections fail (the
    network drops them); the transports asked for, in order."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.asked: list[str] = []

    def _open(self, hwaccel):
        import errno

        self.asked.append(self._av_options()["rtsp_transport"])
        if self.asked[-1] == "tcp":
            raise OSError(errno.EPROTONOSUPPORT, "Protocol not supported")
        raise ConnectionError("no packets over UDP")


def _transports(url: str, attempts: int) -> list[str]:
    source = _RefusesTcp(Sink(), url, RtspOptions(backoff_base_s=0.01, backoff_cap_s=0.01))
    source.start()
    try:
        deadline = time.monotonic() + 10
        while len(source.asked) < attempts and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        source.stop()
    return source.asked[:attempts]


def test_a_camera_refusing_tcp_gets_udp_for_that_connection_only(caplog):
    """UDP is taken for the connection after a 461, not for ever: a camera that refused TCP once (all its TCP
    sessions taken, a reboot) is asked for TCP again at the next connection; the switch is a warning once."""
    caplog.set_level(logging.INFO, "yolov12_serve")
    assert _transports("rtsp://127.0.0.1:1/x", 6) == ["tcp", "udp"] * 3
    warnings = [r for r in caplog.records if "refuses RTSP over TCP" in r.getMessage()]
    assert [r.levelno for r in warnings[:3]] == [logging.WARNING, logging.INFO, logging.INFO]


def test_an_rtsps_camera_refusing_tcp_is_not_said_to_be_received_over_udp(caplog):
    """FFmpeg takes rtsps:// over TCP only (TLS), whatever rtsp_transport says: no switch, and no line saying UDP."""
    caplog.set_level(logging.INFO, "yolov12_serve")
    assert _transports("rtsps://127.0.0.1:1/x", 3) == ["tcp"] * 3
    assert not any("over UDP" in r.getMessage() for r in caplog.records)
