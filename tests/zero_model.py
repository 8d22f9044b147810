"""A model that costs (almost) nothing, with the serving contract: for measuring the server's host path (tests, and
bench/hostpath.py, which imports this file).

A real ONNX graph: input `images` uint8 [B, H, W, 3] (batch, height and width dynamic), output `detections`
float32 [B, max_det, 6] holding no box: Cast, ReduceMax over H, W, C, Unsqueeze, times a [1, max_det, 6] zero
tensor (each image is read once, so the run still scales with its pixels, a little). Its metadata_props are
what our exporter writes (engines.metadata.info_to_props), with the batch range 1..64 and dynamic H/W.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_zero_model"]


def write_zero_model(path: str | Path, imgsz: int = 320, max_det: int = 300, max_batch: int = 64,
                     names: dict[int, str] | None = None) -> Path:
    """Write the zero-cost model to `path` (needs the `onnx` package, a train / test extra); returns the path."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from engines.base import EngineInfo
    from engines.metadata import info_to_props

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    zeros = numpy_helper.from_array(np.zeros((1, max_det, 6), np.float32), "zeros")
    axes = numpy_helper.from_array(np.array([1, 2], np.int64), "axes")
    nodes = [
        helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMax", ["pixels"], ["peak"], axes=[1, 2, 3], keepdims=0),  # [B]
        helper.make_node("Unsqueeze", ["peak", "axes"], ["peak3"]),  # [B, 1, 1]
        helper.make_node("Mul", ["peak3", "zeros"], ["detections"]),  # [B, max_det, 6], all zero
    ]
    graph = helper.make_graph(
        nodes, "zero_cost",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, ["batch", max_det, 6])],
        initializer=[zeros, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="yolov12-serve")
    model.ir_version = 8  # read by every onnxruntime >= 1.14
    info = EngineInfo(names=names or {0: "defect"}, imgsz=(imgsz, imgsz), stride=32, batch=(1, max_batch),
                      dynamic_hw=True, precision="fp32", variant="zero", scale="", max_det=max_det,
                      version="zero-cost", extra={"layout": "end2end", "nms": "onnx", "opset": 17,
                                                  "input": "uint8-nhwc", "source": "yolov12-serve"})
    for k, v in info_to_props(info).items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    tmp = path.with_suffix(path.suffix + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return path
