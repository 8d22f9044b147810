"""Export: the ONNX graph contract, metadata, static/dynamic shapes, a torch-free runtime, and the CLI's errors.

Equality of the exported graph with PyTorch + NMS is in test_engines.py; here the file itself is checked.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import engines
import trainer.export as export_module
from engines import EngineError, EngineInfo
from engines.metadata import ONNX_KEY, info_from_metadata, info_to_props, read_onnx_props
from trainer import YOLO
from trainer.export import ExportError, export, export_main
from yolov12_serve.predict.cli import main as predict_main

REPO = Path(__file__).resolve().parents[1]
ASSET = REPO / "tests" / "assets" / "yolov12n-defects.pt"
NAMES = ["scratch", "dent", "crack", "stain", "missing_part"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained asset, or a random yolov12n (nc=5) in our checkpoint format where it is absent."""
    if ASSET.is_file():
        return ASSET
    from trainer.checkpoint import save_checkpoint
    from trainer.nn import build_model

    torch.manual_seed(0)
    model = build_model("yolov12n.yaml", nc=5, names=NAMES)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "standin.pt", model.eval(), imgsz=320)


@pytest.fixture(scope="module")
def yolo(checkpoint: Path) -> YOLO:
    """The checkpoint loaded once (exports take a YOLO as well as a path)."""
    return YOLO(checkpoint)


@pytest.fixture(scope="module")
def dynamic_onnx(yolo: YOLO, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(yolo, imgsz=(256, 320), batch=3, dynamic=True, conf=0.3, iou=0.6, max_det=50,
                  output=tmp_path_factory.mktemp("dyn") / "dyn.onnx")


def _images(n: int, hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Synthetic inspection frames (what the model sees in service; pure noise drives an untrained net to chaos)."""
    rng = np.random.default_rng(seed)
    try:
        from trainer.data.scene import render_scene
    except ImportError:  # smooth random shading instead
        coarse = rng.integers(40, 200, (n, hw[0] // 16 + 1, hw[1] // 16 + 1, 3)).astype(np.uint8)
        return np.ascontiguousarray(coarse.repeat(16, 1).repeat(16, 2)[:, :hw[0], :hw[1]])
    return np.stack([render_scene(rng, hw)[0] for _ in range(n)])


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


# ----------------------------------------------------------------------------- graph contract
def test_graph_contract(dynamic_onnx: Path) -> None:
    """uint8 NHWC `images` in, float [B, max_det, 6] `detections` out, NMS inside, simplified, checker-clean."""
    proto = onnx.load(str(dynamic_onnx))
    onnx.checker.check_model(proto)
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    b, h, w, c = _dims(inp)
    assert isinstance(b, str) and isinstance(h, str) and isinstance(w, str) and c == 3
    assert out.name == "detections" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert _dims(out)[1:] == [50, 6] and isinstance(_dims(out)[0], str)
    ops = {n.op_type for n in proto.graph.node}
    assert {"NonMaxSuppression", "TopK"} <= ops
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node), "BatchNorm must be fused"


def test_every_softmax_runs_over_the_last_axis(dynamic_onnx: Path) -> None:
    """ONNX Runtime runs a Softmax over any other axis through transposes: the DFL's softmax(1) (as ultralytics
    exports it) took 0.9 ms of a 23 ms yolov12n run at 192x320 on one CPU core."""
    softmaxes = [n for n in onnx.load(str(dynamic_onnx)).graph.node if n.op_type == "Softmax"]
    assert softmaxes and all([a.i for a in n.attribute if a.name == "axis"] == [-1] for n in softmaxes), \
        [(n.name, [a.i for a in n.attribute]) for n in softmaxes]


def test_padding_rows_are_zero_and_detections_best_first(dynamic_onnx: Path) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(dynamic_onnx), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"images": _images(2, (128, 320))})
    assert y.shape == (2, 50, 6) and y.dtype == np.float32
    for det in y:
        n = int((det[:, 4] > 0).sum())
        assert (det[n:] == 0).all(), "rows past the detections must be all zero"
        assert (np.diff(det[:n, 4]) <= 0).all() and (det[:n, 4] > 0.3).all()
        assert np.isin(det[:n, 5], np.arange(5)).all()


def test_metadata_round_trips(dynamic_onnx: Path, yolo: YOLO) -> None:
    info = engines.read_info(dynamic_onnx)
    model = yolo.model
    assert info.names == {int(k): v for k, v in model.names.items()} and info.nc == 5
    assert (info.imgsz, info.stride, info.batch, info.dynamic_hw) == ((256, 320), 32, (1, 3), True)
    assert (info.conf, info.iou, info.max_det, info.precision) == (0.3, 0.6, 50, "fp32")
    assert (info.variant, info.scale) == (model.spec.variant, model.spec.scale)
    assert info.extra["layout"] == "end2end" and info.extra["input"] == "uint8-nhwc"
    props = read_onnx_props(dynamic_onnx)  # the torch-free reader agrees with the onnx package
    assert props == {p.key: p.value for p in onnx.load(str(dynamic_onnx), load_external_data=False).metadata_props}
    assert EngineInfo.from_json(props[ONNX_KEY]) == info
    assert json.loads(props[ONNX_KEY])["imgsz"] == [256, 320]
    # readable keys in ultralytics' conventions; they alone give back the same essentials
    assert props["names"] == str(info.names) and props["imgsz"] == "[256, 320]" and props["stride"] == "32"
    alone = info_from_metadata({k: v for k, v in props.items() if k != ONNX_KEY})
    assert (alone.names, alone.imgsz, alone.batch, alone.dynamic_hw) == (info.names, info.imgsz, (1, 3), True)
    assert info_from_metadata(info_to_props(info)) == info


def test_static_export_is_fixed_and_agrees_with_dynamic(yolo: YOLO, dynamic_onnx: Path, tmp_path: Path) -> None:
    path = export(yolo, imgsz=(128, 320), batch=2, conf=0.3, iou=0.6, max_det=50, simplify=False,
                  output=tmp_path / "static.onnx")
    proto = onnx.load(str(path))
    assert _dims(proto.graph.input[0]) == [2, 128, 320, 3] and _dims(proto.graph.output[0]) == [2, 50, 6]
    static, dynamic = engines.load(path), engines.load(dynamic_onnx)
    assert static.info.batch == (2, 2) and not static.info.dynamic_hw
    x = _images(2, (128, 320), seed=1)
    for a, b in zip(static.infer(x), dynamic.infer(x)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-2)  # pixels: 0.01 px apart at most
    with pytest.raises(EngineError, match="exported for 128x320"):
        static.infer(np.zeros((2, 96, 320, 3), np.uint8))
    with pytest.raises(EngineError, match=r"range 2\.\.2"):
        static.infer(x[:1])


def test_raw_export_is_the_plain_head(yolo: YOLO, tmp_path: Path) -> None:
    """`raw=True`: float NCHW in, [B, 4+nc, N] out, equal to the fused model's eval output."""
    import onnxruntime as ort

    path = export(yolo, imgsz=128, raw=True, simplify=False, output=tmp_path / "raw.onnx")
    proto = onnx.load(str(path))
    assert _dims(proto.graph.input[0]) == [1, 3, 128, 128] and proto.graph.output[0].name == "output0"
    x = np.ascontiguousarray(_images(1, (128, 128), seed=2).transpose(0, 3, 1, 2)).astype(np.float32) / 255
    (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})
    with torch.no_grad():
        ref = copy.deepcopy(yolo.model).eval().fuse()(torch.from_numpy(x)).numpy()
    assert y.shape == ref.shape == (1, 4 + 5, 16 * 16 + 8 * 8 + 4 * 4)
    np.testing.assert_allclose(y, ref, rtol=1e-3, atol=1e-3)
    assert read_onnx_props(path)["layout"] == "raw"


def test_onnx_runtime_needs_no_torch(dynamic_onnx: Path) -> None:
    """The serving path: load and run the export in a process where importing torch fails."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np, engines\n"
            f"e = engines.load({str(dynamic_onnx)!r})\n"
            "out = e.infer(np.zeros((2, 256, 320, 3), np.uint8))\n"
            "assert len(out) == 2 and all(o.shape[1] == 6 for o in out)\n"
            "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]\n"
            "print(engines.read_info(" + repr(str(dynamic_onnx)) + ").names[0])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == engines.read_info(dynamic_onnx).names[0]


# ----------------------------------------------------------------------------- API and CLI errors
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"format": "tflite"}, "unknown format 'tflite'"),
    ({"imgsz": 650}, "not a multiple of the model stride 32: use 640"),
    ({"conf": 1.5}, r"conf must be in \[0, 1\)"),
    ({"iou": 0}, r"iou must be in \(0, 1\]"),
    ({"max_det": 0}, "max_det must be in 1..3840"),
    ({"batch": 0}, "batch must be >= 1"),
    ({"int8": True}, "int8 needs TensorRT calibration"),
    ({"format": "engine", "int8": True}, "int8 needs calibration images: add --data"),
    ({"half": True}, "fp16 ONNX is traced on a GPU"),
    ({"nms": "efficient"}, "TensorRT plugin that ONNX Runtime cannot run"),
    ({"output": "model.engine"}, r"should end in \.onnx"),
])
def test_bad_export_options_say_the_fix(yolo: YOLO, kwargs: dict, message: str) -> None:
    with pytest.raises(ExportError, match=message):
        export(yolo, **kwargs)


def test_engine_export_without_tensorrt_says_how_to_get_it(yolo: YOLO, tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(EngineError, match="TensorRT is not installed"):
            export(yolo, format="engine", output=tmp_path / "m.engine")
        assert not list(tmp_path.iterdir()), "nothing is written when TensorRT is missing"
    else:
        pytest.skip("TensorRT is installed here")


@pytest.mark.parametrize("build_fails", [False, True])
def test_engine_build_leaves_the_users_onnx_alone(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  build_fails: bool) -> None:
    """`best.pt` -> `best.engine` must not write TensorRT's static ONNX over the user's `best.onnx` (which then no
    longer loads in ONNX Runtime), whether the build works or fails, and leaves no work files behind.
    TensorRT is replaced by a builder that records what it was given: all before it is the real export."""
    import engines.build

    weights = tmp_path / "best.pt"
    weights.write_bytes(checkpoint.read_bytes())
    users = export(weights, imgsz=64, dynamic=True, batch=4, simplify=False)
    assert users == tmp_path / "best.onnx"
    before = users.read_bytes()
    given: list[EngineInfo] = []

    def build(onnx_path: Path, output: Path, opts: object) -> Path:
        given.append(engines.read_info(onnx_path))
        if build_fails:
            raise EngineError("the build failed")
        output.write_bytes(b"engine")
        return output

    monkeypatch.setattr(engines.build, "tensorrt_major", lambda: 10)
    monkeypatch.setattr(engines.build, "build_engine", build)
    monkeypatch.setattr(export_module, "_device", lambda device: torch.device("cpu"))
    if build_fails:
        with pytest.raises(EngineError):
            export(weights, format="engine", imgsz=64, simplify=False, nms="efficient")
    else:
        assert export(weights, format="engine", imgsz=64, simplify=False, nms="efficient") == tmp_path / "best.engine"
    assert given and given[0].batch == (1, 1) and given[0].extra["nms"] == "efficient"  # the builder's own ONNX
    assert users.read_bytes() == before
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"best.onnx", "best.pt"} | (set() if build_fails else {"best.engine"}), left


def test_output_that_is_a_folder_is_refused_before_the_trace(checkpoint: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "d.onnx").mkdir()
    assert export_main(["--weights", str(checkpoint), "--output", str(tmp_path / "d.onnx")]) == 2
    err = capsys.readouterr().err
    assert "is a folder: name a file" in err and err.count("\n") == 1, err
    assert [p.name for p in tmp_path.iterdir()] == ["d.onnx"]


def test_yolo_export_and_val_take_ultralytics_spellings_and_name_their_keywords(yolo: YOLO, tmp_path: Path) -> None:
    """format='ONNX' is 'onnx' (ultralytics lowercases it; 'TensorRT' and 'trt' are 'engine'); a mistyped keyword
    of export or val names its near match and every keyword they take (Python's TypeError named neither)."""
    assert Path(yolo.export(format="ONNX", imgsz=64, simplify=False, output=tmp_path / "m.onnx")).is_file()
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(EngineError, match="TensorRT is not installed"):  # not "unknown format"
            yolo.export(format="TensorRT", imgsz=64, output=tmp_path / "m.engine")
    with pytest.raises(TypeError, match=r"export\(\) got an unexpected keyword 'imgs': did you mean 'imgsz'\? it "
                                        r"takes format, imgsz, batch"):
        yolo.export(imgs=64)
    with pytest.raises(TypeError, match=r"val\(\) got an unexpected keyword 'dat': did you mean 'data'\?"):
        yolo.val(dat="x.yaml")


def test_a_failed_save_leaves_no_half_written_files(yolo: YOLO, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk mid-save: the error reaches the user and neither work file (10 MB at n) stays beside theirs."""
    def full_disk(proto: object, path: str) -> None:
        Path(path).write_bytes(b"half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export(yolo, imgsz=64, simplify=False, output=tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [
    ["--weights", "missing.pt"],
    ["--weights", "{ckpt}", "--imgsz", "300"],
    ["--weights", "{ckpt}", "--imgsz", "a,b"],
    ["--weights", "{ckpt}", "--int8"],
    ["--weights", "{ckpt}", "--format", "tflite"],
    ["--weights", "{ckpt}", "--batch", "x"],
    ["--weights", "{ckpt}", "--shapes", "640by640", "--format", "engine"],
    ["--imgsz", "640"],
])
def test_cli_bad_input_is_one_line_and_exit_2(checkpoint: Path, argv: list[str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert export_main([a.replace("{ckpt}", str(checkpoint)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("yolov12-export: error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize(("main", "stated"), [
    (export_main, ["--batch BATCH fixed batch (default: 1), or the largest with --dynamic (default: 32)",
                   "EfficientNMS (efficient) (default: onnx)", "run at once (default: 2)", "GiB (default: 4)"]),
    (predict_main, ["most detections per frame (default: the model's)",
                    "engine instances per device (default: 2; 1 for a .pt on a CPU, or on one core)"]),
])
def test_cli_help_states_the_defaults(main, stated: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """yolov12-export --help left out what --batch, --nms, --contexts and --workspace are when not given (--batch
    is 32 with --dynamic alone), and yolov12-predict --help what --max-det and --instances are."""
    try:
        assert main(["--help"]) == 0
    except SystemExit as e:
        assert e.code in (0, None)
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert [s for s in stated if s not in text] == [], text


def test_cli_writes_the_file(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.onnx"
    with warnings.catch_warnings(record=True) as said:  # the tracer's TracerWarnings are not the user's concern
        warnings.simplefilter("always")
        rc = export_main(["--weights", str(checkpoint), "--imgsz", "96,128", "--max-det", "20", "--no-simplify",
                          "--dynamic", "--output", str(out)])
    assert not [w for w in said if issubclass(w.category, torch.jit.TracerWarning)], [str(w.message) for w in said]
    assert rc == 0 and capsys.readouterr().out.strip() == str(out)
    info = engines.read_info(out)
    assert (info.imgsz, info.max_det, info.batch, info.dynamic_hw) == ((96, 128), 20, (1, 32), True)


def test_console_script_entry_point_runs(tmp_path: Path) -> None:
    """`python -m trainer.export` (what the yolov12-export script calls) exits 2 with one line on a missing file."""
    r = subprocess.run([sys.executable, "-m", "trainer.export", "--weights", str(tmp_path / "nope.pt")],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not found" in r.stderr, r.stderr


def test_yolo_export_method_returns_the_path(checkpoint: Path, tmp_path: Path) -> None:
    path = YOLO(checkpoint).export(format="onnx", imgsz=64, simplify=False, output=tmp_path / "y.onnx")
    assert path == str(tmp_path / "y.onnx") and engines.read_info(path).imgsz == (64, 64)


def test_cli_names_a_binary_file_given_as_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A JPEG renamed to .yaml: one line naming the file and the fix, not the codec's bare complaint."""
    fake = tmp_path / "img.yaml"
    fake.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)))
    assert export_main(["--weights", str(fake)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"yolov12-export: error: {fake} is not a text YAML file ("), err
    assert "pass a model yaml such as yolov12n.yaml" in err
    assert not list(tmp_path.glob("*.onnx"))
