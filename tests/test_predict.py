"""In-process prediction (issue 26): `Predictor` / `YOLO(...).predict` / `yolov12-predict` on every kind of source.

Every kind of source is checked against `Engine.infer` run by the test on the same pixels (the frame the
test decodes and letterboxes itself, with the server's letterbox functions), and every frame of a video is
accounted for. Images are synthetic inspection scenes with defects, made here; videos are H.264 written
with PyAV; the camera is the GStreamer RTSP server on loopback (skipped where it is not installed).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_rtsp import GST_PYTHON, _gstreamer_ok

import engines
from yolov12_serve.predict import Predictor, Result, SourceError
from yolov12_serve.predict.cli import main as predict_main
from yolov12_serve.predict.inputs import load_rgb
from yolov12_serve.preprocess import InputPlanner, letterbox_avframe, letterbox_image
from yolov12_serve.sources.push import decode_frame

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "yolov12_serve" / "assets" / "demo.onnx"
CHECKPOINT = ROOT / "tests" / "assets" / "yolov12n-defects.pt"

pytestmark = pytest.mark.timeout(300)


# ----------------------------------------------------------------------------------------------------- fixtures
def scene(seed: int, hw: tuple[int, int]) -> np.ndarray:
    from trainer.data.synth import render_scene

    return np.ascontiguousarray(np.asarray(render_scene(np.random.default_rng(seed), hw)[0])[..., :3])


@pytest.fixture(scope="module")
def predictor():
    with Predictor(DEMO, device="cpu") as p:
        yield p


@pytest.fixture(scope="module")
def engine():
    """The oracle: the same model, loaded by the test, called one frame at a time."""
    e = engines.load(DEMO, instances=1, threads=1)
    yield e
    e.close()


@pytest.fixture(scope="module")
def planner(engine):
    return InputPlanner(engine.info.imgsz, engine.info.stride, engine.info.dynamic_hw)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Seven PNG scenes of three sizes (lossless: the test reads the very pixels predict reads)."""
    d = tmp_path_factory.mktemp("images")
    sizes = [(240, 320), (360, 640), (300, 400)]
    for i in range(7):
        Image.fromarray(scene(100 + i, sizes[i % 3])).save(d / f"part{i:02d}.png")
    return d


def write_video(path: Path, n: int, hw: tuple[int, int] = (360, 640), fps: int = 25) -> Path:
    """n frames of H.264 with B-frames (decoded out of order: the reader must put them back in order)."""
    import av

    pictures = [scene(200 + k, hw) for k in range(5)]
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = hw[1], hw[0], "yuv420p"
        s.options = {"preset": "ultrafast", "bf": "2", "g": "12"}
        for i in range(n):
            frame = np.roll(pictures[(i // 6) % 5], 4 * i, axis=1)
            out.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        out.mux(s.encode())
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "line.mp4", 37)


def expected(engine, x: np.ndarray, lb) -> np.ndarray:
    """What Engine.infer finds in the letterboxed frame `x`, in source pixels."""
    return lb.unscale(engine.infer(np.ascontiguousarray(x)[None])[0])


def assert_same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, f"{what}: {len(got)} boxes, Engine.infer found {len(want)}"
    np.testing.assert_allclose(got[:, :4], want[:, :4], atol=0.05, err_msg=what)
    np.testing.assert_allclose(got[:, 4], want[:, 4], atol=1e-4, err_msg=what)
    np.testing.assert_array_equal(got[:, 5], want[:, 5], err_msg=what)


# ----------------------------------------------------------------------------------------------------- images
def test_folder_of_images_gives_every_image_in_order_with_engine_boxes(predictor, engine, planner, folder):
    results = predictor.predict(folder)
    files = sorted(folder.iterdir())
    assert [r.path for r in results] == [str(f) for f in files]
    assert [r.frame for r in results] == list(range(len(files)))
    assert {r.source for r in results} == {str(folder)}
    found = 0
    for r, f in zip(results, files):
        rgb = load_rgb(f)
        assert r.orig_shape == rgb.shape[:2] and r.boxes.orig_shape == rgb.shape[:2]
        lb = planner.plan(rgb.shape[:2])
        assert_same(r.boxes.data, expected(engine, letterbox_image(rgb, lb), lb), f.name)
        np.testing.assert_array_equal(r.orig_img, rgb)
        assert set(r.speed) == {"preprocess", "inference", "postprocess", "batch"} and r.speed["inference"] > 0
        assert all(r.names[c] for c in r.boxes.cls)
        found += len(r)
    assert found >= 10, "the scenes should hold defects the demo model finds (else this test proves little)"


def test_jpegs_are_decoded_reduced_as_pushed_frames_and_boxes_land_on_the_full_image(predictor, engine, planner,
                                                                                       tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(scene(7, (720, 1280))).save(path, quality=92)
    (r,) = predictor.predict(str(path))
    with Image.open(path) as img:  # what the server does with a pushed JPEG: libjpeg's DCT scaling, then resize
        lb = planner.plan((720, 1280))
        img.draft("RGB", (lb.new_hw[1], lb.new_hw[0]))
        assert img.size[0] < 1280, "draft should have reduced the decode"
        x = letterbox_image(img, lb)
    assert_same(r.boxes.data, expected(engine, x, lb), path.name)
    assert r.orig_img.shape == (720, 1280, 3) and r.source == str(path) and r.frame == 0
    assert len(r) and r.boxes.xyxy[:, 2].max() > 320, "boxes are in source pixels, not the 320-wide input"


# how a camera stores a picture taken in each EXIF orientation: what undoes Pillow's exif_transpose
STORED = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
          4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
          7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


def stored_as(upright: np.ndarray, orientation: int, fmt: str) -> bytes:
    """The file bytes of `upright` as a phone writes it held that way: pixels turned, EXIF orientation set."""
    image = Image.fromarray(upright)
    if STORED[orientation] is not None:
        image = image.transpose(STORED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_pushed_images_are_turned_upright_as_their_exif_orientation_says(planner):
    """DetectImage and Detect see a photo as every viewer shows it (a portrait phone photo is stored sideways):
    for each of the 8 orientations the engine input and the plan are those of the upright picture."""
    upright = scene(31, (640, 360))
    want = letterbox_image(upright, planner.plan((640, 360)))
    for orientation in STORED:
        x, lb = decode_frame(stored_as(upright, orientation, "PNG"), 0, 0, 0, planner.plan)
        assert lb.src_hw == (640, 360), orientation
        np.testing.assert_array_equal(x, want, err_msg=f"orientation {orientation}")


def test_a_portrait_phone_jpeg_gets_the_same_boxes_from_predict_and_the_server_in_upright_pixels(
        predictor, engine, planner, tmp_path):
    upright = scene(31, (1280, 720))
    path = tmp_path / "portrait.jpg"
    path.write_bytes(stored_as(upright, 6, "JPEG"))  # stored 1280 wide, 720 high: a phone held upright
    x, lb = decode_frame(path.read_bytes(), 0, 0, 0, planner.plan)  # the server's push decoding
    assert lb.src_hw == (1280, 720)
    assert np.abs(x.astype(int) - letterbox_image(upright, lb).astype(int)).mean() < 3  # JPEG noise, not a turn
    (r,) = predictor.predict(str(path))
    assert r.orig_img.shape == (1280, 720, 3)
    assert len(r), "the scene should hold defects the demo model finds (else this test proves little)"
    assert_same(r.boxes.data, expected(engine, x, lb), path.name)
    assert r.boxes.xyxy[:, 3].max() > 720, "boxes are in the upright picture's pixels"


def test_a_16_bit_image_is_refused_with_what_to_do_not_clipped_to_white(predictor, planner, tmp_path):
    """A 16-bit mono PNG (machine-vision cameras write them) would become a white frame: the server answers
    INVALID_ARGUMENT and predict one SourceError, both saying to send 8-bit RGB."""
    from yolov12_serve.errors import InvalidArgumentError

    path = tmp_path / "mono16.png"
    Image.fromarray(np.full((120, 160), 3000, np.uint16)).save(path)
    with pytest.raises(InvalidArgumentError, match=r"mode I;16 \(more than 8 bits a channel\).*8-bit RGB"):
        decode_frame(path.read_bytes(), 0, 0, 0, planner.plan)
    with pytest.raises(SourceError, match=r"mono16.png: cannot read the image .*8-bit RGB"):
        predictor.predict(str(path))
    with Image.open(path) as img, pytest.raises(SourceError, match=r"image0: .*mode I;16 .*8-bit RGB"):
        predictor.predict(img)  # the same picture handed over as a PIL image, then a float one
    with pytest.raises(SourceError, match=r"image1: .*mode F .*8-bit RGB"):
        predictor.predict([Image.fromarray(np.zeros((8, 8), np.uint8)), Image.fromarray(np.ones((8, 8), np.float32))])


def test_glob_list_and_mixed_sources_keep_the_order_named(predictor, folder):
    arr = scene(3, (240, 320))
    results = predictor.predict([str(folder / "part03.png"), str(folder / "part0[0-1].png"), arr])
    assert [(r.source, Path(r.path).name, r.frame) for r in results] == [
        (str(folder / "part03.png"), "part03.png", 0), (str(folder / "part0[0-1].png"), "part00.png", 0),
        (str(folder / "part0[0-1].png"), "part01.png", 1), ("array0", "array0", 0)]


# ----------------------------------------------------------------------------------------------------- arrays
def test_numpy_arrays_are_rgb_frames_answered_like_engine_infer(predictor, engine, planner):
    frames = [scene(30 + k, (360, 640)) for k in range(3)]
    one = predictor.predict(frames[0])
    many = predictor.predict(np.stack(frames[1:]))  # [N, H, W, 3]: N frames of one source
    listed = predictor.predict(frames)
    assert len(one) == 1 and len(many) == 2 and len(listed) == 3
    assert [r.source for r in listed] == ["array0", "array1", "array2"] and [r.frame for r in many] == [0, 1]
    lb = planner.plan((360, 640))
    for k, r in enumerate(listed):
        assert_same(r.boxes.data, expected(engine, letterbox_image(frames[k], lb), lb), f"array {k}")
        assert r.orig_img is frames[k], "a result refers to the caller's array, it does not copy it"
    assert_same(many[0].boxes.data, listed[1].boxes.data, "[N,H,W,3] frame 0")
    bgr = predictor.predict(np.ascontiguousarray(frames[0][..., ::-1]))[0]  # colour matters: RGB is the contract
    assert not np.array_equal(bgr.boxes.data, one[0].boxes.data)


def test_pil_images_are_accepted(predictor, engine, planner):
    rgb = scene(41, (300, 400))
    (r,) = predictor.predict(Image.fromarray(rgb).convert("RGBA"))
    lb = planner.plan((300, 400))
    assert_same(r.boxes.data, expected(engine, letterbox_image(rgb, lb), lb), "PIL image")
    assert r.source == "image0"


# ----------------------------------------------------------------------------------------------------- video
def decode_all(path: Path) -> list:
    import av

    with av.open(str(path)) as c:
        return list(c.decode(video=0))


def test_video_every_frame_accounted_for_in_order_with_engine_boxes(predictor, engine, planner, video):
    frames = decode_all(video)
    assert len(frames) == 37
    results = list(predictor.predict(str(video), stream=True, batch=3))
    assert [r.frame for r in results] == list(range(37)), "every frame once, in order"
    assert max(r.speed["batch"] for r in results) > 1, "offline frames should batch when batch=3"
    lb = planner.plan((360, 640))
    for r, f in zip(results, frames):
        assert r.source == r.path == str(video) and r.orig_shape == (360, 640)
        assert r.time == pytest.approx(f.time)
        assert_same(r.boxes.data, expected(engine, letterbox_avframe(f, lb), lb), f"frame {r.frame}")
    np.testing.assert_array_equal(results[5].orig_img, frames[5].to_ndarray(format="rgb24"))
    assert sum(len(r) for r in results) > 20


def test_vid_stride_keeps_every_nth_frame(predictor, video):
    assert [r.frame for r in predictor.predict(video, vid_stride=4)] == list(range(0, 37, 4))


def test_folder_with_images_and_a_video_gives_images_then_video(predictor, tmp_path, video):
    import shutil

    Image.fromarray(scene(5, (240, 320))).save(tmp_path / "b.png")
    shutil.copy(video, tmp_path / "a.mp4")
    results = predictor.predict(tmp_path, vid_stride=9)
    assert [(Path(r.path).name, r.frame) for r in results] == [("b.png", 0)] + [("a.mp4", k) for k in range(0, 37, 9)]


# ----------------------------------------------------------------------------------------------------- streaming
def test_stream_true_is_a_generator_that_reads_only_a_window_ahead(predictor, folder):
    gen = predictor.predict([str(folder)] * 6, stream=True, window=3)  # 42 frames
    assert not isinstance(gen, list)
    first = next(gen)
    assert first.frame == 0
    time.sleep(1.0)  # a slow consumer: the reader must wait for it, not read everything
    run = predictor._last_run
    assert run.read <= run.yielded + 3, f"read {run.read} frames with {run.yielded} taken and a window of 3"
    rest = list(gen)
    assert len(rest) == 41 and predictor.stats["read"] == 42


def test_a_script_that_exits_right_after_predicting_exits_cleanly():
    """ONNX Runtime aborted the process ('terminate called', status 134) when it exited while the engine built a
    fixed-shape session in the background (after 50 frames of one shape): predict builds none."""
    for pause in (0.05, 0.1, 0.15, 0.2):  # the exit lands inside such a build at one of these (4 in 6 at 0.1 s)
        code = ("import time, numpy as np\n"
                "from yolov12_serve.predict import Predictor\n"
                f"p = Predictor({str(DEMO)!r}, device='cpu')\n"
                f"print(len(p.predict(np.zeros((52, 96, 128, 3), np.uint8))))\ntime.sleep({pause})\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == "52", (pause, out.returncode, out.stderr[-1000:])


def test_closing_the_generator_stops_its_threads(predictor, folder):
    import threading

    before = {t.name for t in threading.enumerate()}
    gen = predictor.predict([str(folder)] * 4, stream=True)
    next(gen)
    gen.close()
    time.sleep(0.3)
    left = {t.name for t in threading.enumerate()} - before
    assert not [n for n in left if n.startswith(("predict-reader", "worker-"))], left


# ----------------------------------------------------------------------------------------------------- thresholds
def test_conf_classes_and_max_det_filter_on_end_to_end_graphs(predictor, folder):
    base = predictor.predict(folder)
    high = predictor.predict(folder, conf=0.8)
    only = predictor.predict(folder, classes=[3, 4])
    top = predictor.predict(folder, max_det=2)
    for b, h, o, t in zip(base, high, only, top):
        assert_same(h.boxes.data, b.boxes.data[b.boxes.conf > 0.8], "conf 0.8")
        assert_same(o.boxes.data, b.boxes.data[np.isin(b.boxes.cls, [3, 4])], "classes 3, 4")
        assert_same(t.boxes.data, b.boxes.data[np.argsort(-b.boxes.conf, kind="stable")[:2]], "max_det 2")
    assert sum(map(len, high)) < sum(map(len, base)) and sum(map(len, only)) < sum(map(len, base))
    with pytest.raises(ValueError, match="classes"):
        predictor.predict(folder, classes=[9])
    names = [predictor.names[3], predictor.names[4]]  # names as the server's AddStream takes them
    for o, n in zip(only, predictor.predict(folder, classes=names)):
        assert_same(n.boxes.data, o.boxes.data, "classes by name")
    # each was a raw error or, worse, silently another filter ('12' was classes 1 and 2, 2.7 was 2)
    for bad, said in [("12", "'12' is not a class"), ([2.7], "2.7 is not a class"), (["nope"], "'nope' is not"),
                      (None, None)]:
        if bad is not None:
            with pytest.raises(ValueError, match=said):
                predictor.predict(folder, classes=bad)
    for kwargs, said in [({"conf": "0.5"}, "conf must be a number"), ({"max_det": 2.5}, "max_det must be an "
                                                                                          "integer")]:
        with pytest.raises(ValueError, match=said):
            predictor.predict(folder, **kwargs)


def test_a_max_det_above_an_end_to_end_graph_s_is_warned_about_once(folder, caplog):
    """An NMS-inside graph keeps at most its exported max_det: asking for more is said once (like a lower conf or
    another iou), not silently capped; asking for up to that many says nothing."""
    import logging

    first = sorted(folder.glob("*.png"))[0]
    with Predictor(DEMO, device="cpu") as p, caplog.at_level(logging.WARNING, logger="yolov12_serve.predict"):
        assert p.info.max_det == 300 and p.info.extra["layout"] == "end2end"
        p.predict(first, max_det=300)
        assert not [r for r in caplog.records if "max_det" in r.getMessage()]
        p.predict(first, max_det=500)
        p.predict(first, max_det=500)
        said = [r.getMessage() for r in caplog.records if "max_det" in r.getMessage()]
    assert len(said) == 1 and "at most 300" in said[0] and "--max-det 500" in said[0], said


def test_pt_checkpoint_predicts_like_its_pytorch_engine_with_host_thresholds(folder):
    ref = engines.load(CHECKPOINT, conf=0.1, iou=0.5, max_det=5)
    planner = InputPlanner(ref.info.imgsz, ref.info.stride, ref.info.dynamic_hw)
    with Predictor(CHECKPOINT, device="cpu") as p:
        results = p.predict(folder, conf=0.1, iou=0.5, max_det=5)
        default = p.predict(folder)
    for r in results:
        rgb = load_rgb(r.path)
        lb = planner.plan(rgb.shape[:2])
        assert_same(r.boxes.data, expected(ref, letterbox_image(rgb, lb), lb), r.path)
    assert max(map(len, results)) == 5 and sum(map(len, results)) > sum(map(len, default))  # conf 0.1 < 0.25



def test_a_pt_engine_with_cuda_graphs_runs_at_the_imgsz_asked(monkeypatch):
    """On CUDA a .pt engine lists the shapes it captures graphs for, at its training size (320 here); predict(imgsz=640)
    planned every frame within those, so it ran at 320 whatever imgsz asked. The real engine on the CPU, carrying
    the metadata CUDA gives it; the shapes that reach it are recorded."""
    import dataclasses

    from engines.base import Engine
    from engines.letterbox import aspect_shapes

    real = engines.load(CHECKPOINT)
    graphs = [list(hw) for hw in aspect_shapes(real.info.imgsz, real.info.stride)]
    seen: list[tuple[int, int]] = []

    class AsOnCuda(Engine):
        info = dataclasses.replace(real.info, extra={**real.info.extra, "graph_shapes": graphs})
        device, instances = "cpu", 1

        def infer(self, batch: np.ndarray) -> list[np.ndarray]:
            seen.append(batch.shape[1:3])
            real.info = self.info  # as predict set it for this call (imgsz, thresholds)
            return real.infer(batch)

    assert real.info.imgsz == (320, 320)
    monkeypatch.setattr(engines, "load", lambda *args, **kwargs: AsOnCuda())
    with Predictor(CHECKPOINT, device="cpu") as p:
        p.predict(np.zeros((1080, 1920, 3), np.uint8), imgsz=640)
        p.predict(np.zeros((1080, 1920, 3), np.uint8))
    assert seen == [(384, 640), (192, 320)]


def test_thresholds_are_the_running_calls_and_a_call_inside_needing_others_is_refused(folder):
    """A .pt engine runs NMS on the host with one setting: each call's is set when it starts (a generator made
    first but read last ran with the later call's conf), and a call started inside a running one with other
    thresholds is refused, naming both, instead of changing the outer call's results under it."""
    with Predictor(CHECKPOINT, device="cpu") as p:
        low, high = p.predict(folder, conf=0.1), p.predict(folder, conf=0.5)
        made_first = p.predict(folder, stream=True, conf=0.1)
        made_last = p.predict(folder, stream=True, conf=0.5)
        got_last, got_first = list(made_last), list(made_first)
        outer = p.predict(folder, stream=True, conf=0.1)
        taken = [next(outer)]
        taken += p.predict(str(folder / "part01.png"), conf=0.1)  # the same thresholds: runs inside
        with pytest.raises(ValueError, match=r"asks for conf 0.5, .* earlier one still running asks for conf 0.1"):
            p.predict(str(folder / "part01.png"), conf=0.5)
        taken += list(outer)
    for a, b in zip(got_first, low):
        assert_same(a.boxes.data, b.boxes.data, f"first made, read last: {a.path}")
    for a, b in zip(got_last, high):
        assert_same(a.boxes.data, b.boxes.data, f"last made, read first: {a.path}")
    for a, b in zip([taken[0], *taken[2:]], low):
        assert_same(a.boxes.data, b.boxes.data, f"outer call around another: {a.path}")
    assert_same(taken[1].boxes.data, low[1].boxes.data, "the call inside")
    assert sum(map(len, low)) > sum(map(len, high))


def test_a_predict_inside_an_open_stream_that_needs_new_engines_leaves_the_stream_running(folder):
    """YOLO.predict with batch > 32 loads the engines again: the stream still open on the old ones runs to its end,
    and they are freed then (they were closed under it: 'the engine was closed')."""
    from trainer import YOLO

    m = YOLO(DEMO)
    whole = m.predict(folder)
    gen = m.predict(folder, stream=True)
    results = [next(gen)]
    old = m._predictor[1]
    inner = m.predict(str(folder / "part02.png"), batch=64)
    assert m._predictor[1] is not old and old.engines, "the old engines are kept while their stream runs"
    results += list(gen)
    assert not old.engines, "and freed when it ends"
    assert len(results) == len(whole) == 7
    for a, b in zip(results, whole):
        assert_same(a.boxes.data, b.boxes.data, a.path)
    assert_same(inner[0].boxes.data, whole[2].boxes.data, "inner")
    m.close()
    with pytest.raises(Exception, match="closed"):
        old.predict(folder)


# ----------------------------------------------------------------------------------------------------- devices
def test_cpu_n_spreads_offline_frames_over_devices_and_keeps_order(folder):
    with Predictor(DEMO, device="cpu:2") as p:
        results = p.predict([str(folder)] * 3)
        cams = p.predict(["synthetic://a?fps=30&size=320x240", "synthetic://b?fps=30&size=320x240"], stream=True)
        seen: dict[str, set[str]] = {}
        for r in cams:
            seen.setdefault(r.source, set()).add(r.device)
            if sum(map(len, seen.values())) == 2 and len(seen) == 2:
                break
        cams.close()
    assert [r.frame for r in results] == list(range(7)) * 3
    assert {r.device for r in results} == {"cpu:0", "cpu:1"}
    assert seen == {"synthetic://a?fps=30&size=320x240": {"cpu:0"}, "synthetic://b?fps=30&size=320x240": {"cpu:1"}}


def test_device_strings():
    from yolov12_serve.predict.pipeline import parse_device

    assert [d.name for d in parse_device("cpu", "onnxruntime")] == ["cpu"]
    assert [d.name for d in parse_device("cpu:3", "onnxruntime")] == ["cpu:0", "cpu:1", "cpu:2"]
    assert [d.name for d in parse_device("0-2,5", "onnxruntime")] == ["cuda:0", "cuda:1", "cuda:2", "cuda:5"]
    assert [d.name for d in parse_device([1, "cuda:3"], "pytorch")] == ["cuda:1", "cuda:3"]
    assert [d.name for d in parse_device(2, "tensorrt")] == ["cuda:2"]
    for bad in ("gpu", "cpu:0", "3-1", "0,0", ""):
        with pytest.raises(ValueError, match="device"):
            parse_device(bad, "onnxruntime")


# ----------------------------------------------------------------------------------------------------- cameras
def test_live_camera_gives_a_slow_caller_the_newest_frame_not_a_queued_one(predictor):
    gen = predictor.predict("synthetic://belt?fps=200&size=640x360", stream=True)  # faster than the engine
    first = next(gen)
    sink = predictor._last_run.sinks[0]
    frames = [first.frame]
    for _ in range(4):
        paused_at = sink.received  # the camera's frame count when the caller stops taking results
        time.sleep(0.5)
        r = next(gen)
        frames.append(r.frame)
        assert r.frame >= paused_at, (f"frame {r.frame} arrived before the caller's pause (frames {paused_at} on "
                                      f"came since): a queued frame or result, not the newest")
        assert len(predictor._last_run.live_results) <= 1
    gen.close()
    assert frames == sorted(frames) and predictor.stats["dropped"] > 0
    assert all(r.time is not None and abs(r.time - time.time()) < 60 for r in [first, r])


def test_live_results_match_engine_infer_on_the_frame_they_report(predictor, engine, planner):
    gen = predictor.predict("synthetic://belt?fps=25&size=640x360&seed=4", stream=True)
    got = [next(gen) for _ in range(4)]
    gen.close()
    lb = planner.plan((360, 640))
    for r in got:
        assert_same(r.boxes.data, expected(engine, letterbox_image(r.orig_img, lb), lb), f"camera frame {r.frame}")


def test_a_live_source_needs_stream_true(predictor):
    with pytest.raises(ValueError, match="stream=True"):
        predictor.predict("rtsp://127.0.0.1:8554/cam")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_camera_is_one_error_naming_it(predictor, caplog):
    caplog.set_level(logging.INFO, "yolov12_serve.sources.rtsp")
    url = f"rtsp://user:secret@127.0.0.1:{free_port()}/cam"
    gen = predictor.predict(url, stream=True)
    with pytest.raises(SourceError, match=r"rtsp://user:\*\*\*@127\.0\.0\.1:\d+/cam: cannot connect") as e:
        next(gen)
    assert "secret" not in str(e.value)
    assert not [r.getMessage() for r in caplog.records if r.name == "yolov12_serve.sources.rtsp"]  # not twice


@pytest.fixture(scope="module")
def rtsp_camera(tmp_path_factory):
    if not _gstreamer_ok():
        pytest.skip("GStreamer RTSP server (python3-gi, gir1.2-gst-rtsp-server-1.0) not installed")
    raw = tmp_path_factory.mktemp("rtsp") / "cam.rgb"
    raw.write_bytes(b"".join(np.roll(scene(300 + k // 5, (360, 640)), 6 * k, axis=1).tobytes() for k in range(25)))
    port = free_port()
    proc = subprocess.Popen([GST_PYTHON, str(ROOT / "tests" / "rtsp_server.py"), "--port", str(port),
                             f"--mount=cam={raw}:640x360"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    assert line.startswith("ready"), line
    yield f"rtsp://127.0.0.1:{port}/cam"
    proc.kill()
    proc.wait(10)


@pytest.mark.slow
def test_rtsp_camera_results_in_source_pixels_match_engine_infer_on_their_frames(predictor, engine, planner,
                                                                                 rtsp_camera):
    gen = predictor.predict(rtsp_camera, stream=True)
    got = []
    for r in gen:
        got.append(r)
        if len(got) == 12:
            break
    gen.close()
    lb = planner.plan((360, 640))
    frames = [r.frame for r in got]
    assert frames == sorted(set(frames)), frames
    for r in got:
        assert r.source == rtsp_camera and r.orig_shape == (360, 640)
        frame = r.picture.frame  # the decoded PyAV frame the result came from
        assert_same(r.boxes.data, expected(engine, letterbox_avframe(frame, lb), lb), f"camera frame {r.frame}")
    assert sum(len(r) for r in got) > 0


# ----------------------------------------------------------------------------------------------------- bad sources
@pytest.mark.parametrize("make, match", [
    (lambda d: d / "missing.jpg", r"missing\.jpg: no such file or folder"),
    (lambda d: (d / "notes.txt").write_text("hi") and d / "notes.txt", r"notes\.txt: unsupported file type '\.txt'"),
    (lambda d: (d / "bad.mp4").write_bytes(np.random.default_rng(0).bytes(5000)) and d / "bad.mp4",
     r"bad\.mp4: not a readable video"),
    (lambda d: (d / "empty").mkdir() or d / "empty", r"empty: the folder holds no image or video"),
    (lambda d: str(d / "*.jpeg"), r"\*\.jpeg: the glob matches nothing"),
    (lambda d: 42, r"unsupported source type int"),
    (lambda d: {"a": 1}, r"unsupported source type dict"),
    (lambda d: np.zeros((10, 10), np.float32), r"array0: expected an RGB uint8 array"),
    (lambda d: "http://example.com/a.jpg", r"http://example\.com/a\.jpg: unsupported URL scheme"),
    (lambda d: [], r"the source list is empty"),
])
def test_bad_source_is_one_clear_error_at_the_call(predictor, tmp_path, make, match):
    source = make(tmp_path)
    with pytest.raises(SourceError, match=match):
        predictor.predict(source, stream=True)  # raised by the call itself, before any result is asked for


def test_corrupt_image_in_a_folder_fails_after_the_images_before_it(predictor, folder, tmp_path):
    for k in range(3):
        (tmp_path / f"{k}.png").write_bytes((folder / f"part0{k}.png").read_bytes())
    (tmp_path / "1b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    gen = predictor.predict(tmp_path, stream=True)
    got = [next(gen), next(gen)]
    with pytest.raises(SourceError, match=r"1b\.png: cannot read the image"):
        next(gen)
    assert [Path(r.path).name for r in got] == ["0.png", "1.png"]


def test_truncated_video_gives_the_frames_it_has_or_one_error(predictor, video, tmp_path):
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    try:
        results = predictor.predict(cut)
    except SourceError as e:
        assert "cut.mp4" in str(e)
    else:
        assert [r.frame for r in results] == list(range(len(results)))


# ----------------------------------------------------------------------------------------------------- results
def test_result_plot_save_and_json(predictor, folder, tmp_path, monkeypatch):
    r = next(r for r in predictor.predict(folder) if len(r) >= 2)
    drawn = r.plot()
    assert drawn.shape == r.orig_img.shape and drawn.dtype == np.uint8
    x1, y1, _, y2 = r.boxes.xyxy[0].round().astype(int)
    assert not np.array_equal(drawn[y1:y2, x1], r.orig_img[y1:y2, x1]), "the box's left edge is drawn"
    out = r.save(tmp_path / "drawn.png")
    assert Image.open(out).size == (r.orig_shape[1], r.orig_shape[0])
    monkeypatch.chdir(tmp_path)
    assert r.save() == f"results_{Path(r.path).name}"  # as ultralytics names it (its frame: its place in the folder)
    assert r.save(tmp_path) == str(tmp_path / f"results_{Path(r.path).name}")  # a folder: the same name in it
    monkeypatch.chdir(Path(r.path).parent)  # where the source is: r.save() used to write over it
    source = Path(r.path).read_bytes()
    with pytest.raises(ValueError, match="would overwrite the source image"):
        r.save(Path(r.path).name)
    assert Path(r.save()).name == f"results_{Path(r.path).name}" and Path(r.path).read_bytes() == source
    Path(r.save()).unlink()
    with pytest.raises(ValueError, match=r"name a picture file \(.jpg, .png, ...\) or a folder"):
        r.save(tmp_path / "drawn.xyz")
    d = json.loads(r.to_json())
    assert d["path"] == r.path and d["frame"] == r.frame and d["shape"] == list(r.orig_shape)
    assert [det["class"] for det in d["detections"]] == r.boxes.cls.tolist()
    assert d["detections"][0]["name"] == r.names[int(r.boxes.cls[0])]
    assert d["detections"][0]["box"]["x1"] == pytest.approx(float(r.boxes.xyxy[0, 0]), abs=0.01)
    assert isinstance(r, Result) and len(r.boxes.xywh) == len(r) and (r.boxes.xyxyn <= 1).all()


def test_boxes_index_and_iterate_as_ultralytics_boxes_do():
    """The loop ultralytics' docs teach, `for box in r.boxes: x1, y1, x2, y2 = box.xyxy[0]; int(box.cls[0])`, and
    masks like `r.boxes[r.boxes.conf > 0.5]`, work on our numpy boxes (they were a TypeError: not iterable)."""
    from yolov12_serve.predict import Boxes

    data = np.array([[10, 20, 30, 60, 0.9, 2], [0, 0, 40, 20, 0.3, 1], [5, 5, 15, 15, 0.7, 0]], np.float32)
    boxes = Boxes(data, (100, 200), ids=np.array([4, 0, 7]))
    seen = [(box.xyxy[0].tolist(), float(box.conf[0]), int(box.cls[0]), int(box.id[0])) for box in boxes]
    assert seen == [([10, 20, 30, 60], pytest.approx(0.9), 2, 4), ([0, 0, 40, 20], pytest.approx(0.3), 1, 0),
                    ([5, 5, 15, 15], pytest.approx(0.7), 0, 7)]
    sure = boxes[boxes.conf > 0.5]
    assert isinstance(sure, Boxes) and sure.shape == (2, 6) and sure.id.tolist() == [4, 7]
    assert boxes[1:].cls.tolist() == [1, 0] and boxes[0].shape == (1, 6) and sure.orig_shape == (100, 200)
    assert boxes.xywhn[0].tolist() == pytest.approx([0.1, 0.4, 0.1, 0.4])


def test_track_gives_each_object_one_id_through_a_video(predictor, video, tmp_path, capsys):
    """track=True: the same boxes, each with its object's id (0 in an object's first frame), the same while the
    object slides right 4 px a frame (the video's scenes change every 6 frames: a scene's objects leave, others
    come); the summary, the drawing and the CLI carry the ids, and the CLI counts the objects."""
    plain = list(predictor.predict(video))
    tracked = list(predictor.predict(video, track=True))
    assert all(r.boxes.id is None and not r.boxes.is_track for r in plain)
    for a, b in zip(plain, tracked, strict=True):
        np.testing.assert_array_equal(a.boxes.data, b.boxes.data)
        assert b.boxes.is_track and b.boxes.id.shape == (len(b),)
    path: dict[int, list[tuple[int, float, float]]] = {}  # id -> (frame, centre x, width) per sighting
    for r in tracked:
        for i, box in zip(r.boxes.id.tolist(), r.boxes.xywh.tolist(), strict=True):
            if i:
                path.setdefault(i, []).append((r.frame, box[0], box[2]))
    found = sum(len(r) for r in tracked)
    assert path and sum(map(len, path.values())) >= 0.6 * found and len(path) * 3 <= found, path
    long = [p for p in path.values() if len(p) >= 4]
    assert long and all(p[-1][1] > p[0][1] for p in long), long  # carried right with the picture
    # frame to frame an id stays on its object: 4 px on, give or take a third of its width (a crack's boxes jitter)
    steps = [(b[1] - a[1] - 4) / b[2] for p in path.values() for a, b in itertools.pairwise(p)
             if b[0] == a[0] + 1]
    assert steps and max(map(abs, steps)) < 1 / 3, steps
    r = next(r for r in tracked if (r.boxes.id > 0).any())
    k = int(np.argmax(r.boxes.id > 0))
    assert r.summary()[k]["track_id"] == r.boxes.id[k] and "track_id" not in plain[r.frame].summary()[k]
    assert not np.array_equal(r.plot(), plain[r.frame].plot())  # the label says '#ID'
    rc = predict_main(["--weights", str(DEMO), "--source", str(video), "--track", "--no-progress",
                       "--save-json", str(tmp_path / "t.json")])
    assert rc == 0 and f"{len(path)} objects" in capsys.readouterr().out
    records = json.loads((tmp_path / "t.json").read_text())
    assert {d["track_id"] for rec in records for d in rec["detections"]} - {0} == set(path)


# ----------------------------------------------------------------------------------------------------- YOLO
def test_yolo_opens_an_onnx_engine_for_predict_without_importing_torch(folder):
    code = (f"import sys; sys.modules['torch'] = None\n"
            f"from trainer import YOLO\n"
            f"m = YOLO({str(DEMO)!r})\n"
            f"rs = m.predict({str(folder)!r}, conf=0.5)\n"
            f"ts = m.track({str(folder)!r}, conf=0.5)\n"
            f"assert all(t.boxes.is_track and not r.boxes.is_track for r, t in zip(rs, ts))\n"
            f"print(len(rs), sum(len(r) for r in rs), m.names[0])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    n, boxes, name = out.stdout.split()
    assert int(n) == 7 and int(boxes) > 0 and name == "scratch"


def test_yolo_predict_names_its_keywords_before_loading(folder):
    """ultralytics' keywords: `verbose` is taken (nothing is printed per frame anyway), `save` says where saving
    is, a typo gets its near match; all before the engines load (it was a bare TypeError after)."""
    from trainer import YOLO

    m = YOLO(DEMO)
    assert len(m.predict(folder, verbose=False)) > 0
    with pytest.raises(TypeError, match=r"predict\(\) takes no 'save': save each result with result.save\(\)"):
        m.predict(folder, save=True)
    with pytest.raises(TypeError, match="unexpected keyword 'confidence': did you mean 'conf'"):
        m.predict(folder, confidence=0.5)
    with pytest.raises(ValueError, match="batch must be an integer >= 1, got 'x'"):
        m.predict(folder, batch="x")
    m.close()


def test_yolo_engine_refuses_to_train_validate_or_export(tmp_path):
    from engines.metadata import write_engine_file
    from trainer import YOLO

    info = engines.read_info(DEMO)
    plan = write_engine_file(tmp_path / "m.engine", info, b"not a real plan")
    for path in (DEMO, plan):
        m = YOLO(path)
        assert m.names == info.names
        for call, kw in ((m.train, {"data": "x.yaml"}), (m.val, {"data": "x.yaml"}), (m.export, {})):
            with pytest.raises(ValueError, match="exported engine, for predict only"):
                call(**kw)
        with pytest.raises(ValueError, match="no PyTorch model"):
            m.model  # noqa: B018
    with pytest.raises(engines.EngineError, match="not found"):
        YOLO(tmp_path / "missing.onnx")
    assert YOLO(DEMO, task="detect").names == info.names  # ultralytics' way to open an ONNX (a TypeError here)
    with pytest.raises(ValueError, match="task='segment': this project's YOLOv12 models detect only"):
        YOLO(DEMO, task="segment")


def test_yolo_pt_predict_uses_the_checkpoint_and_follows_in_memory_changes(folder):
    import torch

    from trainer import YOLO

    m = YOLO(CHECKPOINT)
    first = m.predict(folder)
    with Predictor(CHECKPOINT, device="cpu") as p:
        for a, b in zip(first, p.predict(folder)):
            assert_same(a.boxes.data, b.boxes.data, a.path)
    kept = m._predictor[1]
    assert m(str(folder / "part00.png"))[0].path.endswith("part00.png")  # __call__ = predict
    assert m._predictor[1] is kept, "unchanged weights: the engines loaded by the first call are used again"
    with torch.no_grad():
        for prm in m.model.head.parameters():
            prm.zero_()
    changed = m.predict(folder)  # a snapshot of the changed weights, not the file
    assert sum(map(len, changed)) != sum(map(len, first)) and m._predictor[1] is not kept
    m.close()


# ----------------------------------------------------------------------------------------------------- CLI
def test_cli_saves_annotated_images_video_and_json(folder, video, tmp_path, capsys):
    out = tmp_path / "out"
    rc = predict_main(["--weights", str(DEMO), "--source", str(folder), str(video), "--save", str(out),
                       "--save-json", str(out / "r.json"), "--vid-stride", "2", "--no-progress"])
    assert rc == 0
    assert "26 frames" in capsys.readouterr().out  # 7 images + 19 of 37 video frames
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.name for p in folder.glob("*.png"))
    saved = decode_all(out / "line.mp4")
    assert len(saved) == 19 and (saved[0].height, saved[0].width) == (360, 640)
    records = json.loads((out / "r.json").read_text())
    assert len(records) == 26 and [r["frame"] for r in records[7:]] == list(range(0, 37, 2))
    drawn, plain = np.asarray(Image.open(out / "part01.png")), load_rgb(folder / "part01.png")
    assert drawn.shape == plain.shape and not np.array_equal(drawn, plain)


@pytest.mark.parametrize("args, match", [
    (["--source", "/no/such/dir"], "/no/such/dir: no such file or folder"),
    (["--source", "rtsp://127.0.0.1:{port}/x"], "cannot connect"),
    (["--source", "{folder}", "--batch", "0"], "batch must be"),
    (["--source", "{folder}", "--classes", "7"], "classes"),
    # outputs that cannot be written: refused before the engine loads (they ended in tracebacks after it)
    (["--source", "{folder}", "--save", "/proc/x"], "--save /proc/x: cannot write /proc/x: No such file"),
    (["--source", "{folder}", "--save", "{a_file}"], "is a file: give a folder"),
    (["--source", "{folder}", "--save-json", "{folder}"], "is a folder: give a file name"),
    (["--source", "{folder}", "--device", "cpu:999"], "'cpu:N' takes N in 1..64"),  # these hung loading
    (["--source", "{folder}", "--instances", "100000"], "instances must be 1..64"),
])
def test_cli_bad_input_is_one_line_and_exit_2(folder, capsys, args, match):
    args = [a.format(port=free_port(), folder=folder, a_file=__file__) for a in args]
    rc = predict_main(["--weights", str(DEMO), *args, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and match in err[0] and err[0].startswith("yolov12-predict: "), err


def test_cli_bad_weights_exit_2(folder, capsys):
    assert predict_main(["--weights", "/no/model.onnx", "--source", str(folder)]) == 2
    assert "not found" in capsys.readouterr().err
    assert predict_main(["--weights", str(folder), "--source", str(folder)]) == 2
    assert "is a directory, not an engine file: give the engine file in it" in capsys.readouterr().err


def test_cli_failed_run_leaves_no_json_and_no_empty_save_folder(folder, tmp_path, capsys):
    """A run that fails (the model does not load, or a frame cannot be read) leaves no valid-looking `[ ]` or torn
    `[` --save-json and no empty --save folder it made; an earlier JSON there stays as it was. Results written
    before a failure are kept (a long run must not lose them to its last frame)."""
    bad_model = tmp_path / "bad.onnx"
    bad_model.write_bytes(b"not a model")
    out = tmp_path / "out"
    outputs = ["--save", str(out / "annotated"), "--save-json", str(out / "json" / "r.json"), "--no-progress"]
    assert predict_main(["--weights", str(bad_model), "--source", str(folder), *outputs]) == 2
    assert "bad.onnx" in capsys.readouterr().err
    assert not out.exists()

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)  # the first frame fails, after the load
    assert predict_main(["--weights", str(DEMO), "--source", str(broken), *outputs]) == 2
    assert "a.png: cannot read the image" in capsys.readouterr().err
    assert not out.exists()

    (out / "json").mkdir(parents=True)
    (out / "json" / "r.json").write_text('[{"earlier": 1}]')
    assert predict_main(["--weights", str(DEMO), "--source", str(broken), *outputs]) == 2
    assert (out / "json" / "r.json").read_text() == '[{"earlier": 1}]'
    assert sorted(p.name for p in out.rglob("*")) == ["json", "r.json"]  # no r.json.tmp, no annotated/

    (broken / "0.png").write_bytes((folder / "part00.png").read_bytes())  # read before a.png: its result is kept
    assert predict_main(["--weights", str(DEMO), "--source", str(broken), *outputs]) == 2
    assert [r["path"] for r in json.loads((out / "json" / "r.json").read_text())] == [str(broken / "0.png")]


def test_a_stream_left_half_read_when_the_script_ends_exits_cleanly(folder):
    """`g = predict(..., stream=True); next(g)` and the end of the script: the workers, still in the engine while the
    interpreter went down, aborted the process (SIGABRT, 'terminate called without an active exception')."""
    code = (f"from trainer import YOLO; g = YOLO({str(DEMO)!r}).predict({str(folder)!r}, stream=True); next(g)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])


def test_a_wall_clock_step_does_not_make_a_tracked_camera_count_its_parts_again(predictor, monkeypatch):
    """`track=True` on a camera tracks at each frame's monotonic ingest time: the host clock stepped an hour forwards
    (NTP correcting a wrong RTC) mid-stream leaves the parts in sight with their ids (tracked at the wall-clock
    capture time, every track was forgotten at the step and each part in sight got a new id)."""
    offset_ns = 0
    wall = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: wall() + offset_ns)  # what a step of the host clock looks like
    gen = predictor.predict("synthetic://belt?fps=20&size=640x360&seed=4", stream=True, track=True)
    try:
        before = [next(gen) for _ in range(30)]
        offset_ns = 3600 * 10**9
        after = [next(gen) for _ in range(3)]
    finally:
        gen.close()
    recent = {int(i) for r in before[-5:] if r.boxes.id is not None for i in r.boxes.id if i}
    kept = {int(i) for r in after if r.boxes.id is not None for i in r.boxes.id if i}
    assert recent, "no part was tracked before the step"
    assert after[-1].time > before[-1].time + 3000  # the step shows in the results' wall-clock time
    assert recent & kept, (sorted(recent), sorted(kept))
