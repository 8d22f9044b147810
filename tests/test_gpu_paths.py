"""The GPU paths of issue 28, checked on the CPU from metadata, graphs and stand-in engines (they need CUDA to run):
cameras planned within a TensorRT engine's profiles, batches padded up to an engine's minimum, an engine with
fewer profile sets than --instances served with those it has, the NMS class offsets kept FP32 in the exported
graph and in FP16 TensorRT builds, CUDA graphs captured at load not while serving, pinned staging buffers."""

from __future__ import annotations

import threading
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from engines.base import Engine, EngineError, EngineInfo, pad_batch, run_padded
from engines.letterbox import aspect_shapes, pick_shape
from engines.metadata import read_info, write_engine_file
from engines.tensorrt import context_slots
from yolov12_serve.frames import Frame, FrameResult
from yolov12_serve.preprocess import InputPlanner
from yolov12_serve.runtime import load_engine, plannable_shapes
from yolov12_serve.scheduler import Batch, DeadlineScheduler
from yolov12_serve.worker import DeviceWorker

ROOT = Path(__file__).resolve().parents[1]
BUILT = [(640, 640), (384, 640)]  # yolov12-export --format engine --imgsz 640 --shapes 640x640,384x640


def trt_info() -> EngineInfo:
    """The metadata our builder writes for a dynamic engine built with --shapes 640x640,384x640, 2 contexts."""
    extra = {"layout": "end2end", "input": "uint8-nhwc", "tensorrt": "10.9", "contexts": 2,
             "profiles_per_context": 2, "shapes": [list(s) for s in BUILT]}
    return EngineInfo(names={0: "scratch"}, imgsz=(640, 640), stride=32, batch=(1, 16), dynamic_hw=True,
                      precision="fp16", extra=extra)


def static_info() -> EngineInfo:
    """A static engine: yolov12-export --format engine --imgsz 384,640 --batch 4 (batches of exactly 4)."""
    return EngineInfo(names={0: "scratch"}, imgsz=(384, 640), stride=32, batch=(4, 4), dynamic_hw=False,
                      precision="fp16", extra={"layout": "end2end", "input": "uint8-nhwc", "contexts": None,
                                               "profiles_per_context": 0, "shapes": None})


class StandIn(Engine):
    """An engine that takes what `info` says (check_batch), records the batches it ran, and answers each image with
    one box whose score is the image's mean pixel: results can be matched to frames."""

    def __init__(self, info: EngineInfo, instances: int = 2) -> None:
        self.info, self.device, self.instances = info, "cpu", instances
        self.ran: list[tuple[int, int, int]] = []
        self._lock = threading.Lock()

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        self.check_batch(batch)
        with self._lock:
            self.ran.append(tuple(batch.shape[:3]))
        return [np.array([[1, 1, 9, 9, float(x.mean()), 0]], np.float32) for x in batch]


# ------------------------------------------------------------------------------------------------ profiles
def test_cameras_are_planned_within_the_shapes_a_tensorrt_engine_was_built_for(tmp_path: Path):
    """From the engine file's metadata alone: a 4:3 camera runs at 640x640 (the 480x640 a dynamic engine would get
    is in no profile: every batch of it raised and counted toward the device's failure streak), 16:9 at 384x640."""
    path = write_engine_file(tmp_path / "m.engine", trt_info(), b"PLAN")
    info = read_info(path)
    assert info.shapes == BUILT
    planner = InputPlanner.for_engine(info)
    assert InputPlanner(info.imgsz, info.stride, info.dynamic_hw).plan((480, 640)).input_hw == (480, 640)  # before
    for src, want in [((480, 640), (640, 640)), ((360, 640), (384, 640)), ((1080, 1920), (384, 640)),
                      ((640, 360), (640, 640)), ((600, 800), (640, 640)), ((1080, 2560), (384, 640))]:
        lb = planner.plan(src)
        assert lb.input_hw == want, (src, lb)
        assert lb.new_hw[0] <= want[0] and lb.new_hw[1] <= want[1]
    assert planner.full_shape == (640, 640) and plannable_shapes(planner) == BUILT
    engine = StandIn(info)
    with pytest.raises(EngineError, match="not one of the shapes the engine was built for"):
        engine.check_batch(np.zeros((1, 480, 640, 3), np.uint8))
    engine.check_batch(np.zeros((1, 384, 640, 3), np.uint8))


def test_pick_shape_keeps_the_scale_else_shrinks_least():
    assert pick_shape((360, 640), [(640, 640), (384, 640)], (640, 640)) == (384, 640)  # the smaller that fits
    assert pick_shape((720, 1280), [(384, 640), (640, 640)], (640, 640)) == (384, 640)
    assert pick_shape((480, 640), [(384, 640)], (640, 640)) == (384, 640)  # none keeps it: shrunk least
    assert pick_shape((640, 480), [(384, 640), (640, 384)], (640, 640)) == (640, 384)
    assert aspect_shapes((320, 320)) == [(192, 320), (256, 320), (320, 320), (320, 256), (320, 192)]


def test_warm_up_and_serving_stay_within_the_built_shapes_and_pad_to_the_minimum_batch():
    """Load and warm-up run only the shapes an engine was built for; a static --batch 4 engine gets full batches
    only (a batch of 1 failed its warm-up), and a worker answers 1..3 frames each with its own result, the
    padding's dropped."""
    profiled = StandIn(trt_info())
    load_engine(lambda path, **kw: profiled, "cuda:0", str(ROOT / "pyproject.toml"), 2, 8, None)
    assert {(h, w) for _, h, w in profiled.ran} == set(BUILT)
    engine = StandIn(static_info())
    loaded = load_engine(lambda path, **kw: engine, "cuda:0", str(ROOT / "pyproject.toml"), 2, 8, None)
    assert {b for b, _, _ in engine.ran} == {4} and {(h, w) for _, h, w in engine.ran} == {(384, 640)}
    assert loaded.max_batch == 4 and loaded.camera_shape == (384, 640)
    engine.ran.clear()
    published: list[FrameResult] = []
    scheduler = DeadlineScheduler(loaded.cost, loaded.max_batch, process_late=True)
    worker = DeviceWorker("cuda:0", engine, scheduler, published.append, threads=1)
    lb = loaded.planner.plan((360, 640))
    for n in (1, 3):
        frames = [Frame("cam", i, np.full((384, 640, 3), 10 * (i + 1), np.uint8), lb, 0, 0.0, 1e9)
                  for i in range(n)]
        published.clear()
        assert worker.run(Batch(frames, (384, 640), 0.01))
        assert [r.frame_id for r in published] == list(range(n)) and all(r.error is None for r in published)
        assert [float(r.detections[0, 4]) for r in published] == [10.0 * (i + 1) for i in range(n)]
    assert engine.ran == [(4, 384, 640), (4, 384, 640)]
    assert len(pad_batch(np.zeros((2, 32, 32, 3), np.uint8), 4)) == 4 and (pad_batch(
        np.zeros((2, 32, 32, 3), np.uint8), 4)[2:] == 114).all()
    assert len(run_padded(StandIn(EngineInfo({0: "a"}, (32, 32), batch=(4, 4))), np.zeros((1, 32, 32, 3),
                                                                                          np.uint8))) == 1


# ------------------------------------------------------------------------------------------------ contexts
def test_an_engine_with_fewer_profile_sets_than_instances_serves_with_those_it_has():
    """ultralytics' dynamic engines have one optimisation profile: at the default --instances 2 they failed to load.
    Now they run one context, and the server runs as many worker threads and places by that number."""
    assert context_slots(dynamic=True, n_profiles=1, per_context=None, instances=2) == 1  # ultralytics'
    assert context_slots(dynamic=True, n_profiles=4, per_context=2, instances=2) == 2  # ours, --contexts 2
    assert context_slots(dynamic=True, n_profiles=4, per_context=2, instances=3) == 2
    assert context_slots(dynamic=True, n_profiles=6, per_context=2, instances=1) == 1
    assert context_slots(dynamic=False, n_profiles=1, per_context=None, instances=3) == 3  # static: any number
    with pytest.raises(EngineError):
        context_slots(dynamic=True, n_profiles=2, per_context=1, instances=0)

    from yolov12_serve.config import ServerConfig
    from yolov12_serve.core import ServerCore

    def load(path, device="cpu", instances=1, **opts):
        return StandIn(trt_info(), instances=min(instances, 1))  # asked for 2, runs 1

    core = ServerCore(ServerConfig(engines=[str(ROOT / "pyproject.toml")], devices=["cuda:0"], metrics_port=-1,
                                   instances=2), load_engine=load)
    core.start()
    try:
        rt = core.runtimes["cuda:0"]
        assert rt.loaded.instances == 1 and rt.worker.threads == 1
        assert core.server_info().engines[0][3] == 1  # GetServerInfo says what runs, not what was asked
    finally:
        core.drain(1.0)


# ------------------------------------------------------------------------------------------------ FP16 offsets
@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, onnx.ModelProto]:
    """A yolov12n exported in FP32 and in FP16 (traced on the CPU here: torch runs fp16 on the CPU too), with
    shape inference run, so every tensor has its type."""
    from trainer.export import export_onnx
    from trainer.nn.builder import build_model

    torch.manual_seed(0)
    model = build_model("yolov12n.yaml", nc=5)
    out = {}
    for name, half in (("fp32", False), ("fp16", True)):
        path = export_onnx(model, tmp_path_factory.mktemp(name) / f"{name}.onnx", (320, 320), batch=2,
                           dynamic=True, half=half)
        out[name] = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    return out


def _types(proto: onnx.ModelProto) -> dict[str, int]:
    g = proto.graph
    return {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]} | {
        t.name: t.data_type for t in g.initializer}


def _offset_path(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes between the model's output and NonMaxSuppression's boxes: box decoding and the class offsets."""
    nodes = list(proto.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    nms = next(n for n in nodes if n.op_type == "NonMaxSuppression")
    seen, todo = [], [nms.input[0]]
    while todo:
        node = producer.get(todo.pop())
        if node is None or node in seen or node.name.startswith("/model/"):
            continue
        seen.append(node)
        todo.extend(node.input)
    return seen


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_nms_class_offsets_are_computed_in_fp32_in_the_exported_graph(exports, precision):
    proto = exports[precision]
    types = _types(proto)
    path = _offset_path(proto)
    ops = {n.op_type for n in path}
    assert {"Mul", "Add", "ReduceMax", "ReduceMin"} <= ops, ops  # box decoding and class x span offsets
    floats = [o for n in path for o in n.output if types.get(o) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert floats and all(types[o] == onnx.TensorProto.FLOAT for o in floats), \
        [(o, types[o]) for o in floats if types[o] != onnx.TensorProto.FLOAT]
    model_types = {types.get(o) for n in proto.graph.node if n.op_type == "Conv" for o in n.output}
    assert model_types == {onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT}


def test_fp16_tensorrt_builds_pin_everything_after_the_model_to_fp32(exports):
    """A weakly typed FP16 build (TensorRT < 11) chooses FP16 for any layer unless told: keep_postprocess_fp32 pins
    the layers after the model's last one. Checked on a stand-in network laid out as TensorRT's parser lays out
    the exported graph (its nodes in order, their names and output types)."""
    from engines.build import keep_postprocess_fp32

    trt = types.SimpleNamespace(float32="float32", float16="float16", int32="int32", int64="int64", bool="bool")
    proto = exports["fp32"]
    elem = _types(proto)
    as_trt = {onnx.TensorProto.FLOAT: "float16", onnx.TensorProto.FLOAT16: "float16",  # what FP16 mode would pick
              onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32", onnx.TensorProto.BOOL: "bool"}

    class Layer:
        def __init__(self, node: onnx.NodeProto) -> None:
            self.name, self.precision = node.name, None
            self.outputs = [types.SimpleNamespace(dtype=as_trt.get(elem.get(o), "int64")) for o in node.output]
            self.num_outputs = len(self.outputs)

        def get_output(self, k):
            return self.outputs[k]

        def set_output_type(self, k, dtype):
            self.outputs[k].dtype = dtype

    layers = [Layer(n) for n in proto.graph.node]
    network = types.SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i])
    assert keep_postprocess_fp32(trt, network) > 0
    by_name = {layer.name: layer for layer in layers}
    for node in _offset_path(proto):
        layer = by_name[node.name]
        if any(o.dtype in ("float32", "float16") for o in layer.outputs):
            assert layer.precision == "float32" and all(o.dtype == "float32" for o in layer.outputs
                                                        if o.dtype in ("float32", "float16")), node.name
    assert all(layer.precision is None for layer in layers if layer.name.startswith("/model/"))
    assert by_name["/Cast"].precision is None  # the input's cast feeds the model: it stays as the build chooses


# ------------------------------------------------------------------------------------------------ PyTorch backend
def test_pytorch_engine_plans_within_its_cuda_graph_shapes():
    """On CUDA the PyTorch backend says which shapes it captures (graph_shapes); the server plans every camera
    within them and captures them all at load (Engine.prepare), so nothing is captured while serving."""
    from engines.pytorch import _info

    ckpt = types.SimpleNamespace(imgsz=320, source="ours", model=types.SimpleNamespace(
        names={0: "a"}, stride=torch.tensor([8.0, 16.0, 32.0]), spec=types.SimpleNamespace(variant="turbo", scale="n")))
    gpu, cpu = _info(ckpt, "fp16", 8, 0.25, 0.7, 300, graphs=True), _info(ckpt, "fp32", 8, 0.25, 0.7, 300)
    assert cpu.plan_shapes is None and cpu.shapes is None
    assert gpu.shapes is None  # not a constraint: other shapes run, eagerly
    planner = InputPlanner.for_engine(gpu)
    assert plannable_shapes(planner) == aspect_shapes((320, 320)) == gpu.plan_shapes
    assert {planner.plan(hw).input_hw for hw in [(360, 640), (480, 640), (1080, 2560), (500, 500), (1920, 1080)]} \
        <= set(gpu.plan_shapes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs and pinned memory)")
def test_pytorch_engine_captures_at_prepare_and_never_while_serving(tmp_path: Path):
    import engines
    from trainer.checkpoint import save_checkpoint
    from trainer.nn.builder import build_model

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "n.pt", build_model("yolov12n.yaml", nc=5).eval(), imgsz=128)
    eng = engines.load(ckpt, device="cuda:0", instances=2, max_batch=4)
    shapes = eng.info.plan_shapes
    eng.prepare(shapes, 4)
    slots = eng._pool.items
    assert all(s.staging.is_pinned() for s in slots)
    assert all(len(s.graphs) == len(shapes) * 3 for s in slots)  # buckets 1, 2, 4
    eng.infer(np.zeros((3, *shapes[0], 3), np.uint8))
    eng.infer(np.zeros((1, 64, 64, 3), np.uint8))  # not planned: eager, no capture
    assert all(len(s.graphs) == len(shapes) * 3 for s in slots)
