"""Engines at run time: ONNX Runtime end to end against PyTorch + torchvision NMS, batching, shapes, threads, errors.

The checkpoint is tests/assets/yolov12n-defects.pt (yolov12n turbo, 5 classes, trained on the
synthetic defects). Where it is absent a stand-in is built (random weights with raised class
scores, so there are detections to compare). TensorRT and CUDA tests skip with their reason here.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms, box_iou

import engines
from engines import EngineError, EngineInfo
from engines.calibration import CalibrationBatches, letterbox_frame
from engines.metadata import engine_header, info_from_metadata, write_engine_file
from engines.nms import nms_numpy
from trainer import YOLO

ASSET = Path(__file__).parent / "assets" / "yolov12n-defects.pt"
IMGSZ = 320
MAX_BATCH = 4


# ----------------------------------------------------------------------------- fixtures
def _standin(path: Path) -> Path:
    """Random yolov12n (nc=5): BatchNorm statistics measured on synthetic frames (so outputs depend on the
    image; untrained statistics collapse every score to one value) and a class head scaled to give detections."""
    from trainer.checkpoint import save_checkpoint
    from trainer.nn import build_model

    torch.manual_seed(0)
    model = build_model("yolov12n.yaml", nc=5, names=["scratch", "dent", "crack", "stain", "missing_part"])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration pass
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(_frames(4, (IMGSZ, IMGSZ), seed=1)).permute(0, 3, 1, 2).float() / 255)
    for cls in model.head.cv3:
        torch.nn.init.normal_(cls[-1].weight, std=0.25)
        cls[-1].bias.data[:] = -5.0
    return save_checkpoint(path, model.eval(), imgsz=IMGSZ)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ASSET if ASSET.is_file() else _standin(tmp_path_factory.mktemp("ckpt") / "standin.pt")


@pytest.fixture(scope="module")
def yolo(checkpoint: Path) -> YOLO:
    """The checkpoint loaded once; exports take it as well as a path."""
    return YOLO(checkpoint)


@pytest.fixture(scope="module")
def model(yolo: YOLO) -> torch.nn.Module:
    """The checkpoint's model, fused and in eval mode: the reference the engines must reproduce."""
    return copy.deepcopy(yolo.model).float().eval().fuse()


@pytest.fixture(scope="module")
def onnx_path(yolo: YOLO, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped form: dynamic batch 1..4 and H/W up to 320, NMS inside, simplified."""
    from trainer.export import export

    return export(yolo, format="onnx", imgsz=IMGSZ, batch=MAX_BATCH, dynamic=True,
                  output=tmp_path_factory.mktemp("onnx") / "model.onnx")


@pytest.fixture(scope="module")
def engine(onnx_path: Path) -> engines.Engine:
    return engines.load(onnx_path)


def _frames(n: int, hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    """n synthetic inspection frames (the defect scenes the model was trained on) at exactly hw."""
    rng = np.random.default_rng(seed)
    try:
        from trainer.data.scene import render_scene
    except ImportError:  # the scene renderer is missing: plain panels with bright blobs
        out = rng.integers(70, 110, (n, *hw, 3), dtype=np.uint8)
        for img in out:
            for _ in range(4):
                y, x = rng.integers(0, hw[0] - 24), rng.integers(0, hw[1] - 24)
                img[y:y + rng.integers(8, 24), x:x + rng.integers(8, 24)] = rng.integers(0, 255, 3)
        return out
    frames = np.stack([render_scene(rng, hw)[0] for _ in range(n)]).astype(np.int16)
    # sensor noise: no two anchors see identical pixels, so no two boxes tie on score (ties make NMS order-dependent)
    return (frames + rng.normal(0, 4, frames.shape)).clip(0, 255).astype(np.uint8)


def _reference(model: torch.nn.Module, batch: np.ndarray, info: EngineInfo) -> list[np.ndarray]:
    """PyTorch model + torchvision NMS on a uint8 NHWC batch."""
    with torch.no_grad():
        return _torchvision_nms(model(torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255), info)


def _torchvision_nms(pred: torch.Tensor, info: EngineInfo) -> list[np.ndarray]:
    """[B, 4+nc, N] -> per image: best class per anchor, > conf, class-aware batched_nms, the max_det best."""
    out = []
    for x in pred.transpose(1, 2):
        score, cls = x[:, 4:].max(1)
        keep = score > info.conf
        xywh, score, cls = x[keep, :4], score[keep], cls[keep]
        xyxy = torch.cat((xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), 1)
        k = batched_nms(xyxy, score, cls, info.iou)[:info.max_det]
        out.append(torch.cat((xyxy[k], score[k, None], cls[k, None].float()), 1).numpy())
    return out


def _assert_same(got: np.ndarray, want: np.ndarray, iou: float = 0.99, score_tol: float = 1e-3) -> None:
    """Same count; every reference box matched by a distinct box of the same class at IoU >= iou, scores close."""
    assert got.shape == want.shape, f"{len(got)} detections, reference has {len(want)}"
    if not len(want):
        return
    ious = box_iou(torch.from_numpy(want[:, :4]), torch.from_numpy(got[:, :4])).numpy()
    ious[want[:, None, 5] != got[None, :, 5]] = 0
    ious[np.abs(want[:, None, 4] - got[None, :, 4]) > score_tol] = 0
    taken = np.zeros(len(got), bool)
    for i in np.argsort(-want[:, 4]):
        j = int(np.argmax(np.where(taken, -1, ious[i])))
        assert ious[i, j] >= iou and not taken[j], f"reference box {want[i]} has no match (best IoU {ious[i, j]:.4f})"
        taken[j] = True


# ----------------------------------------------------------------------------- equality with PyTorch
@pytest.mark.parametrize("hw", [(320, 320), (192, 320), (320, 192)], ids=["square", "16:9", "portrait"])
def test_onnx_matches_pytorch_and_torchvision_nms(engine: engines.Engine, model: torch.nn.Module,
                                                  hw: tuple[int, int]) -> None:
    frames = _frames(MAX_BATCH, hw, seed=hw[0] + hw[1])
    got, want = engine.infer(frames), _reference(model, frames, engine.info)
    assert sum(len(w) for w in want) > 0, "the model finds nothing on these frames: the comparison would be empty"
    for g, w in zip(got, want):
        assert g.dtype == np.float32 and g.shape[1:] == (6,)
        _assert_same(g, w)


def test_every_batch_size_gives_the_same_per_image_result(engine: engines.Engine) -> None:
    frames = _frames(MAX_BATCH, (192, 320), seed=7)
    single = [engine.infer(frames[i:i + 1])[0] for i in range(MAX_BATCH)]
    for b in range(2, MAX_BATCH + 1):
        for i, dets in enumerate(engine.infer(frames[:b])):
            _assert_same(dets, single[i], iou=0.999, score_tol=1e-4)


def test_letterboxed_camera_frame_maps_back_to_frame_pixels(engine: engines.Engine, model: torch.nn.Module) -> None:
    frame = _frames(1, (360, 640), seed=3)[0]  # a 16:9 camera
    hw = engines.fit_shape(frame.shape[:2], engine.info.imgsz, engine.info.stride)
    assert hw == (192, 320)
    lb = engines.plan_letterbox(frame.shape[:2], hw)
    x = letterbox_frame(frame, hw)[None]
    dets = engine.infer(x)[0]
    _assert_same(dets, _reference(model, x, engine.info)[0])
    mapped = lb.unscale(dets)
    assert (mapped[:, [0, 2]] >= 0).all() and (mapped[:, [0, 2]] <= 640).all() and (mapped[:, [1, 3]] <= 360).all()


def test_concurrent_calls_on_k_sessions_match_sequential(onnx_path: Path) -> None:
    eng = engines.load(onnx_path, instances=2, threads=1)
    assert eng.instances == 2 and eng.threads == 1
    batches = [_frames(2, hw, seed=i) for i, hw in enumerate([(192, 320), (320, 320), (320, 192), (256, 256)])]
    expected = [eng.infer(b) for b in batches]
    results: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(2):
                results[i] = eng.infer(batches[i])
        except BaseException as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for i, exp in enumerate(expected):
        for g, w in zip(results[i], exp):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-4)


def test_close_frees_the_sessions_while_the_engine_object_lives(onnx_path: Path) -> None:
    """The server freezes its start-up objects out of garbage collection, so an engine in a reference cycle is never
    collected: close() itself must let go of the ONNX Runtime sessions (their memory)."""
    eng = engines.load(onnx_path, instances=2, threads=1)
    eng.infer(_frames(1, (192, 320), seed=1))
    refs = [weakref.ref(s) for s in eng._sessions]  # what close() must release
    eng.close()
    assert all(r() is None for r in refs)
    with pytest.raises(EngineError, match="closed"):
        eng.infer(_frames(1, (192, 320), seed=1))


def test_single_frames_of_a_recurring_shape_move_to_fixed_shape_sessions_with_the_same_result(
        onnx_path: Path) -> None:
    eng = engines.load(onnx_path, instances=2, threads=1, fixed_after=3)
    frames = {hw: _frames(1, hw, seed=hw[0]) for hw in [(192, 320), (320, 192)]}
    pair = _frames(2, (192, 320), seed=5)
    dynamic = {hw: eng.infer(x)[0] for hw, x in frames.items()}
    pair_dynamic = eng.infer(pair)
    for _ in range(3):
        for x in frames.values():
            eng.infer(x)
        eng.infer(pair)
    end = time.monotonic() + 60
    while len(eng.fixed_shapes) < 2 and time.monotonic() < end:  # built in the background, 0.3 s each here
        time.sleep(0.05)
    assert eng.fixed_shapes == [(1, 192, 320, 3), (1, 320, 192, 3)]  # batches of 2 never get one
    for hw, x in frames.items():
        np.testing.assert_allclose(eng.infer(x)[0], dynamic[hw], rtol=0, atol=1e-4)
    for g, w in zip(eng.infer(pair), pair_dynamic):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-4)
    eng.close()


def test_fixed_shape_sessions_are_capped_and_a_failed_build_leaves_the_dynamic_session_serving(caplog) -> None:
    from engines.ort_fixed import FixedShapeSessions

    built = []
    fixed = FixedShapeSessions(lambda shape: built.append(shape) or f"session{shape}", instances=2, after=2,
                               max_shapes=2)
    for h in (64, 96, 128):
        for _ in range(3):
            fixed.saw((1, h, 64, 3))
    fixed.saw((2, 64, 64, 3))
    fixed.saw((2, 64, 64, 3))
    end = time.monotonic() + 10
    while len(fixed.shapes) < 2 and time.monotonic() < end:
        time.sleep(0.01)
    time.sleep(0.1)
    assert fixed.shapes == [(1, 64, 64, 3), (1, 96, 64, 3)] and len(built) == 4  # 2 shapes x 2 instances
    assert fixed.get(1, (1, 96, 64, 3)) == "session(1, 96, 64, 3)" and fixed.get(0, (1, 128, 64, 3)) is None

    def fail(shape):
        raise RuntimeError("no")

    broken = FixedShapeSessions(fail, instances=1, after=1)
    with caplog.at_level(logging.WARNING):
        broken.saw((1, 64, 64, 3))
        end = time.monotonic() + 10
        while "could not be built" not in caplog.text and time.monotonic() < end:
            time.sleep(0.01)
    assert broken.get(0, (1, 64, 64, 3)) is None and "the dynamic one serves" in caplog.text
    broken.saw((1, 96, 64, 3))  # no further tries
    assert broken.shapes == []


def test_a_process_exiting_while_a_fixed_shape_session_builds_exits_cleanly() -> None:
    """ONNX Runtime aborted the process (status 134, sometimes 139) when Python exited while the background
    thread built a fixed-shape session (after 50 single frames of a shape): closing waits for the build, and
    open sets are closed at exit. On the old code 5 of these 6 runs aborted."""
    import subprocess
    import sys

    demo = Path(__file__).resolve().parents[1] / "yolov12_serve" / "assets" / "demo.onnx"
    code = ("import sys, time, numpy as np\nimport engines\n"
            f"e = engines.load({str(demo)!r}, instances=2)\n"
            "x = np.zeros((1, 96, 128, 3), np.uint8)\nfor _ in range(52): e.infer(x)\n"
            "time.sleep(float(sys.argv[1]))\n")
    for pause in ("0.05", "0.1", "0.15", "0.2", "0.1", "0.1"):
        out = subprocess.run([sys.executable, "-c", code, pause], capture_output=True, text=True, timeout=120,
                             cwd=demo.parents[2])
        assert out.returncode == 0, (pause, out.returncode, out.stderr[-1000:])


def test_raw_head_export_runs_with_host_nms(yolo: YOLO, engine: engines.Engine, tmp_path: Path) -> None:
    """`--raw` (ultralytics' layout): the backend converts to float NCHW and runs numpy NMS; same detections."""
    from trainer.export import export

    raw = engines.load(export(yolo, imgsz=(192, 320), batch=2, dynamic=True, raw=True,
                              simplify=False, output=tmp_path / "raw.onnx"))
    assert raw.info.extra["layout"] == "raw"
    frames = _frames(2, (192, 320), seed=11)
    for g, w in zip(raw.infer(frames), engine.infer(frames)):
        _assert_same(g, w, iou=0.999, score_tol=1e-4)


def test_numpy_nms_matches_torchvision() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 300, (2, 2, 600))
    wh = rng.uniform(5, 80, (2, 2, 600))
    scores = rng.uniform(0, 1, (2, 4, 600)) ** 3
    pred = np.concatenate((xy, wh, scores), 1).astype(np.float32)  # [B, 4+nc, N]
    info = EngineInfo(names=dict(enumerate("abcd")), imgsz=(320, 320), conf=0.2, iou=0.5, max_det=50)
    want = _torchvision_nms(torch.from_numpy(pred), info)
    assert all(len(w) for w in want)
    for got, w in zip(nms_numpy(pred, info.conf, info.iou, info.max_det), want):
        _assert_same(got, w, iou=0.9999, score_tol=1e-6)


# ----------------------------------------------------------------------------- PyTorch backend
def test_pytorch_backend_on_cpu_matches_reference(checkpoint: Path, model: torch.nn.Module) -> None:
    eng = engines.load(checkpoint, instances=2)
    assert eng.info.precision == "fp32" and eng.info.dynamic_hw and eng.info.nc == 5
    assert engines.read_info(checkpoint) == eng.info  # the metadata reader agrees without building an engine
    frames = _frames(2, (192, 320), seed=5)
    for g, w in zip(eng.infer(frames), _reference(model, frames, eng.info)):
        _assert_same(g, w, iou=0.999, score_tol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the PyTorch fp16 + CUDA graph path)")
def test_pytorch_backend_cuda_graphs_match_cpu(checkpoint: Path, model: torch.nn.Module) -> None:
    eng = engines.load(checkpoint, device="cuda:0", max_batch=8)
    assert eng.info.precision == "fp16"
    frames = _frames(3, (192, 320), seed=9)  # batch 3 runs in the bucket of 4, padded
    ref = _reference(model, frames, eng.info)
    for _ in range(2):  # first call captures, second replays
        for g, w in zip(eng.infer(frames), ref):
            _assert_same(g, w, iou=0.95, score_tol=2e-2)
    single = eng.infer(frames[:1])[0]
    _assert_same(single, ref[0], iou=0.95, score_tol=2e-2)


# ----------------------------------------------------------------------------- TensorRT
@pytest.fixture(scope="module")
def trt_engine_path(yolo: YOLO, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here (NVIDIA's index is unreachable)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from trainer.export import export

    return export(yolo, format="engine", imgsz=IMGSZ, batch=MAX_BATCH, dynamic=True, half=True,
                  shapes=[(320, 320), (192, 320)], contexts=2, output=tmp_path_factory.mktemp("trt") / "m.engine")


def test_tensorrt_engine_matches_onnx(trt_engine_path: Path, engine: engines.Engine) -> None:
    trt = engines.load(trt_engine_path, device="cuda:0", instances=2)
    assert trt.info.precision == "fp16" and trt.info.extra["contexts"] == 2
    for hw in [(320, 320), (192, 320)]:
        frames = _frames(MAX_BATCH, hw, seed=1)
        for b in (1, MAX_BATCH):
            for g, w in zip(trt.infer(frames[:b]), engine.infer(frames[:b])):
                _assert_same(g, w, iou=0.95, score_tol=2e-2)


def test_tensorrt_errors_say_the_fix(trt_engine_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert engines.load(trt_engine_path, device="cuda:0", instances=3).instances == 2  # two profile sets: two
    assert "--contexts 3" in capsys.readouterr().out  # said at load, with the fix
    trt = engines.load(trt_engine_path, device="cuda:0")
    with pytest.raises(EngineError, match="outside the engine's range"):
        trt.infer(np.zeros((MAX_BATCH + 1, 320, 320, 3), np.uint8))
    with pytest.raises(EngineError, match="not one of the shapes the engine was built for"):
        trt.infer(np.zeros((1, 256, 256, 3), np.uint8))
    with pytest.raises(EngineError, match="run on a GPU"):
        engines.load(trt_engine_path, device="cpu")


def test_tensorrt_missing_is_reported_with_the_fix(onnx_path: Path, tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        fake = write_engine_file(tmp_path / "m.engine", engines.read_info(onnx_path), b"plan")
        with pytest.raises(EngineError, match="TensorRT is not installed"):
            engines.load(fake, device="cuda:0")
    else:
        pytest.skip("TensorRT is installed here")


# ----------------------------------------------------------------------------- metadata and headers
def test_engine_header_round_trip_and_ultralytics_layout(onnx_path: Path, tmp_path: Path) -> None:
    info = engines.read_info(onnx_path)
    path = write_engine_file(tmp_path / "ours.engine", info, b"\x00PLANBYTES")
    offset, meta = engine_header(path)
    assert path.read_bytes()[offset:] == b"\x00PLANBYTES"
    assert engines.read_info(path) == info == info_from_metadata(meta)
    # ultralytics writes its own keys; they load too (raw head, float NCHW input)
    theirs = b'{"stride": 32, "batch": 8, "imgsz": [384, 640], "names": {"0": "a", "1": "b"}, "task": "detect", ' \
             b'"args": {"dynamic": true, "half": true, "nms": false}, "version": "8.4.0"}'
    (tmp_path / "theirs.engine").write_bytes(len(theirs).to_bytes(4, "little") + theirs + b"PLAN")
    t = engines.read_info(tmp_path / "theirs.engine")
    assert (t.names, t.imgsz, t.batch, t.dynamic_hw, t.precision) == ({0: "a", 1: "b"}, (384, 640), (1, 8), True,
                                                                         "fp16")
    assert t.extra["layout"] == "raw" and t.extra["source"] == "ultralytics"


def test_calibration_batches_are_letterboxed_like_frames(tmp_path: Path) -> None:
    from PIL import Image

    files = []
    for i, (h, w) in enumerate([(360, 640), (480, 480), (100, 300)]):
        arr = np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    batches = list(CalibrationBatches(files, (192, 320), batch=3))
    assert len(batches) == 1 and batches[0].shape == (3, 192, 320, 3) and batches[0].dtype == np.uint8
    first = letterbox_frame(np.asarray(Image.open(files[0])), (192, 320))
    np.testing.assert_array_equal(batches[0][0], first)
    assert (batches[0][1][:, :32] == 114).all()  # a square image in a 16:9 input: grey side bars
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(EngineError, match="unreadable"):
        list(CalibrationBatches([tmp_path / "bad.png"], (64, 64), batch=1))


def test_calibration_at_the_engine_batch_refuses_fewer_images_than_the_batch(tmp_path: Path) -> None:
    """TensorRT reads a whole profile batch of frames per pointer: a smaller batch would be read past its end."""
    from PIL import Image

    files = []
    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    with pytest.raises(EngineError, match="batch 8 and the dataset has 3 images"):
        CalibrationBatches(files, (64, 64), batch=8, exact_batch=True)
    assert CalibrationBatches(files, (64, 64), batch=8).batch == 3  # not tied to an engine: fewer is fine
    assert CalibrationBatches(files, (64, 64), batch=3, exact_batch=True).batch == 3


def test_tensorrt_profiles_follow_the_export_s_input_layout() -> None:
    """Our exports take uint8 NHWC frames, raw-head ones float NCHW: the profiles must have the input's layout
    (TensorRT refuses a profile whose channel dimension differs from the network's)."""
    from engines.build import BuildOptions, profile_shapes

    def info(layout: str) -> EngineInfo:
        return EngineInfo(names={0: "a"}, imgsz=(640, 640), batch=(1, 32), dynamic_hw=True, extra={"input": layout})

    opts = BuildOptions(batch=16, dynamic=True, shapes=[(384, 640)])
    assert profile_shapes(info("uint8-nhwc"), opts) == [((1, 384, 640, 3), (16, 384, 640, 3), (16, 384, 640, 3))]
    assert profile_shapes(info("float-nchw"), opts) == [((1, 3, 384, 640), (16, 3, 384, 640), (16, 3, 384, 640))]
    assert profile_shapes(info("float-nchw"), BuildOptions(batch=4, dynamic=True)) == [
        ((1, 3, 32, 32), (4, 3, 640, 640), (4, 3, 640, 640))]


# ----------------------------------------------------------------------------- bad files and inputs
def _truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


@pytest.mark.parametrize(("make", "message"), [
    (lambda src, d: d / "missing.onnx", "not found"),
    (lambda src, d: (d / "g.onnx").write_bytes(np.random.default_rng(0).bytes(4096)) and d / "g.onnx",
     "not (a readable )?(an )?ONNX model"),
    (lambda src, d: _truncated(src, d / "t.onnx"), "corrupt or truncated"),
    (lambda src, d: (d / "e.onnx").write_bytes(b"") or d / "e.onnx", "is empty"),
    (lambda src, d: d, "is a directory, not an engine file: give the engine file in it"),
    (lambda src, d: (d / "m.bin").write_bytes(src.read_bytes()) and d / "m.bin", r"unknown engine format '\.bin'"),
    (lambda src, d: (d / "g.engine").write_bytes(b"\x00" * 64) and d / "g.engine", "no metadata header"),
    (lambda src, d: (d / "g.pt").write_bytes(b"garbage") and d / "g.pt", "a .pt engine is a checkpoint"),
], ids=["missing", "garbage", "truncated", "empty", "directory", "wrong-suffix", "engine-no-header", "pt-garbage"])
def test_bad_files_say_what_to_do(onnx_path: Path, tmp_path: Path, make, message: str) -> None:
    path = make(onnx_path, tmp_path)
    with pytest.raises(EngineError, match=message):
        engines.load(path)


@pytest.mark.parametrize(("batch", "message"), [
    (np.zeros((MAX_BATCH + 1, 320, 320, 3), np.uint8), r"batch of 5 outside the engine's range 1\.\.4.*--batch"),
    (np.zeros((1, 320, 320, 3), np.float32), "expected a uint8"),
    (np.zeros((320, 320, 3), np.uint8), "expected a uint8"),
    (np.zeros((1, 320, 320, 4), np.uint8), "expected a uint8"),
    (np.zeros((1, 200, 320, 3), np.uint8), "multiples of 32"),
    (np.zeros((1, 384, 320, 3), np.uint8), "within 320x320"),
], ids=["batch-too-large", "float", "no-batch-axis", "rgba", "not-stride-multiple", "too-tall"])
def test_bad_batches_say_what_to_do(engine: engines.Engine, batch: np.ndarray, message: str) -> None:
    with pytest.raises(EngineError, match=message):
        engine.infer(batch)


def test_cuda_device_without_cuda_provider_is_explained(onnx_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(EngineError, match="onnxruntime-gpu") as e:
        engines.load(onnx_path, device="cuda:0")
    assert "yolov12-serve --gpus cpu; yolov12-predict --device cpu; device='cpu' from Python" in str(e.value)
    with pytest.raises(EngineError, match="unknown device"):
        engines.load(onnx_path, device="tpu")
    with pytest.raises(EngineError, match="it takes threads, spinning"):
        engines.load(onnx_path, max_batch=8)


def _edit_metadata(src: Path, dst: Path, edit) -> Path:
    """A copy of `src` whose `yolov12_serve` metadata JSON is replaced by `edit(dict) -> dict | str`."""
    import json

    import onnx

    proto = onnx.load(str(src))
    props = {p.key: p.value for p in proto.metadata_props}
    new = edit(json.loads(props["yolov12_serve"]))
    props["yolov12_serve"] = new if isinstance(new, str) else json.dumps(new)
    del proto.metadata_props[:]
    for k, v in props.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(dst))
    return dst


def test_metadata_the_graph_contradicts_is_refused_at_load(yolo: YOLO, onnx_path: Path, tmp_path: Path) -> None:
    """Class names a raw head's [B, 4+nc, N] output contradicts, an imgsz a static graph contradicts, and malformed
    metadata are one EngineError line naming the file at load, not wrong labels or an error on every frame.
    An NMS-inside graph's output does not carry its class count: fewer names than classes still load (an id without
    a name is shown by its number)."""
    from trainer.export import export

    raw = export(yolo, imgsz=160, batch=1, raw=True, simplify=False, output=tmp_path / "raw160.onnx")
    assert engines.load(raw).info.nc == 5
    cases = {
        "raw80.onnx": (raw, lambda d: {**d, "names": {str(i): f"c{i}" for i in range(80)}},
                       r"names 80 classes .* outputs \[1, 9, "),
        "raw3.onnx": (raw, lambda d: {**d, "names": {"0": "a", "1": "b", "2": "c"}}, r"names 3 classes"),
        "imgsz640.onnx": (raw, lambda d: {**d, "imgsz": [640, 640]}, r"takes 160x160 input but .* imgsz 640x640"),
        "names_list.onnx": (onnx_path, lambda d: {**d, "names": ["a", "b", "c", "d", "e"]},
                            r"corrupt yolov12_serve metadata "
                            r"\('names' must map class ids 0\.\.N-1 to text, got a list"),
        "names_gap.onnx": (onnx_path, lambda d: {**d, "names": {"0": "a", "7": "b"}}, r"corrupt yolov12_serve"),
        "bad_json.onnx": (onnx_path, lambda d: "{not json", r"corrupt yolov12_serve metadata"),
        "not_object.onnx": (onnx_path, lambda d: "[1, 2]", r"corrupt yolov12_serve metadata"),
    }
    for name, (src, edit, why) in cases.items():
        path = _edit_metadata(src, tmp_path / name, edit)
        with pytest.raises(EngineError) as err:
            engines.load(path)
        msg = str(err.value)
        assert msg.startswith(str(path)) and "\n" not in msg and "yolov12-export" in msg, (name, msg)
        assert re.search(why, msg), (name, msg)
    fewer = engines.load(_edit_metadata(onnx_path, tmp_path / "e2e3.onnx",
                                        lambda d: {**d, "names": {"0": "a", "1": "b", "2": "c"}}))
    assert fewer.info.nc == 3
