"""The blank and frozen picture check (picture_check.py) and the small grey samples it takes."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from engines.letterbox import plan_letterbox
from yolov12_serve.picture_check import PictureCheck
from yolov12_serve.preprocess import letterbox_image, small_grey


def test_a_problem_is_reported_once_it_lasts_and_cleared_by_the_first_good_sample():
    rng = np.random.default_rng(0)
    scene = lambda: rng.integers(0, 255, (36, 64), dtype=np.uint8)  # noqa: E731 - live: every sample differs
    black = np.full((36, 64), 3, np.uint8)
    check = PictureCheck(after_s=10)
    assert check.add(scene(), 0) == "" and check.add(black, 2) == ""  # blank, but not for long yet
    assert check.add(black, 8) == "" and check.add(black + 1, 12) == "blank"  # 10 s after it began: reported
    assert check.add(scene(), 14) == ""  # the first good sample clears it
    still = scene()
    assert check.add(still, 16) == "" and check.add(still.copy(), 18) == ""  # the same frame: frozen from 18 on
    assert check.add(still.copy(), 27) == "" and check.add(still.copy(), 28) == "frozen"
    dim = (still // 8).astype(np.uint8)  # a dark scene (levels 0..31) still varies: neither blank nor frozen
    assert check.classify(dim) == "" and check.add(dim, 30) == ""


def test_small_grey_reads_a_synthetic_camera_s_frame_box():
    strip = np.zeros((90, 480, 3), np.uint8)
    strip[:, 160:320] = 200  # the box the frame shows is all bright
    lb = plan_letterbox((90, 160), (96, 160))
    for image in (strip, Image.fromarray(strip)):  # kept as an array, or as a PIL image when frames are resized
        grey = small_grey(functools.partial(letterbox_image, image, lb, (160, 0, 320, 90)))
        assert grey.ndim == 2 and grey.size <= 80 * 45 and grey.dtype == np.uint8, grey.shape
        assert grey.min() == grey.max() == 200  # the box, not the dark strip around it
    assert small_grey(np.zeros((96, 160, 3), np.uint8)) is None  # a pushed frame: not a camera's


def test_a_stream_reports_a_frozen_camera_and_forgets_it_when_the_camera_stops_streaming():
    """Stream.put samples a frame every PICTURE_CHECK_S of ingest time; a camera that leaves STREAMING (lost, being
    reconnected) is judged again from scratch, its problem cleared (its not streaming is what is told then)."""
    from yolov12_serve.frames import now
    from yolov12_serve.picture_check import PICTURE_CHECK_S
    from yolov12_serve.sources.base import StreamState
    from yolov12_serve.stream import Stream

    stream = Stream("cam", "synthetic://cam", "synthetic", 0.0, 0.045, lambda s: None, lambda f, r: None,
                    lambda s: None)
    stream.set_state(StreamState.STREAMING)
    stream.watch_picture(after_s=1.0)
    strip = np.random.default_rng(1).integers(0, 255, (90, 480, 3), dtype=np.uint8)
    lb = plan_letterbox((90, 160), (96, 160))
    t0 = now()
    for k in range(3):  # the same box of the strip each time: frozen (samples come 0.75-1.25 x PICTURE_CHECK_S apart)
        stream.put(functools.partial(letterbox_image, strip, lb, (0, 0, 160, 90)), lb, 0,
                   ingest_time=t0 + k * 1.3 * PICTURE_CHECK_S)
    assert stream.picture_problem == "frozen" and stream.view().picture_problem == "frozen"
    stream.set_state(StreamState.RECONNECTING, "connection lost")
    assert stream.picture_problem == ""


def test_a_looped_recording_is_not_taken_for_a_frozen_camera():
    """A 1 s clip looped at 25 fps (a recording replayed as a camera, the test RTSP server's mounts): samples taken
    exactly 2 s apart would land on the same frame of the loop every time; uneven spacing does not."""
    from yolov12_serve.frames import now
    from yolov12_serve.sources.base import StreamState
    from yolov12_serve.stream import Stream

    stream = Stream("clip", "/videos/clip.mp4", "file", 0.0, 0.045, lambda s: None, lambda f, r: None, lambda s: None)
    stream.set_state(StreamState.STREAMING)
    stream.watch_picture(after_s=10.0)
    strip = np.random.default_rng(2).integers(0, 255, (90, 400, 3), dtype=np.uint8)
    lb = plan_letterbox((90, 160), (96, 160))
    t0 = now()
    for k in range(25 * 60):  # a minute of frames
        x = (k % 25) * 8
        stream.put(functools.partial(letterbox_image, strip, lb, (x, 0, x + 160, 90)), lb, 0, ingest_time=t0 + k / 25)
    assert stream.picture_problem == ""


def test_a_frame_whose_picture_cannot_be_read_never_ends_the_camera():
    """Sampling and snapshots run in the camera's own thread (Stream.put): a frame form they cannot convert (a GPU
    frame swscale refuses, say) turns the check off and fails the snapshot with why, and the frame still goes on."""
    import threading

    from yolov12_serve.frames import now
    from yolov12_serve.preprocess import letterbox_avframe
    from yolov12_serve.snapshot import PictureUnreadableError
    from yolov12_serve.sources.base import StreamState
    from yolov12_serve.stream import Stream

    class Unreadable:  # what PyAV would raise on a frame it cannot convert
        width, height = 1920, 1080

        def reformat(self, *args, **kwargs):
            raise ValueError("cannot convert a cuda frame")

        def to_ndarray(self, *args, **kwargs):
            raise ValueError("cannot convert a cuda frame")

    stream = Stream("gpu-cam", "rtsp://h/s", "rtsp", 0.0, 0.045, lambda s: None, lambda f, r: None, lambda s: None)
    stream.set_state(StreamState.STREAMING)
    stream.watch_picture(after_s=1.0)
    lb = plan_letterbox((1080, 1920), (192, 320))
    outcome: list[object] = []

    def snapshot() -> None:
        try:
            outcome.append(stream.pictures.take(5))
        except PictureUnreadableError as e:
            outcome.append(e)

    waiter = threading.Thread(target=snapshot)
    waiter.start()
    while not stream.pictures.wanted:
        threading.Event().wait(0.01)
    frame = stream.put(functools.partial(letterbox_avframe, Unreadable(), lb), lb, 0, ingest_time=now())
    waiter.join(5)
    assert frame is not None  # the frame went on to the scheduler
    assert len(outcome) == 1 and isinstance(outcome[0], PictureUnreadableError) and "cuda frame" in str(outcome[0])
    assert stream._picture_check is None and stream.picture_problem == ""  # the check is off, nothing reported
