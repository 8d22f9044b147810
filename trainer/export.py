"""Export a model to ONNX (NMS inside the graph) or to a TensorRT engine, with its metadata inside the file.

The ONNX graph contract (what `engines` and outside tools rely on):
- input `images`: uint8 [B, H, W, 3] RGB, NHWC. The layout change and /255 happen in the graph (the
  1/255 folded into the first convolution's weights), so the host does no float work and moves 4x
  fewer bytes to a GPU.
- output `detections`: float32 [B, max_det, 6] (x1, y1, x2, y2, score, class) in input pixels, best
  first; rows past the image's detections are all zero (score 0).
- NMS in the graph: each anchor keeps its best class, scores <= conf are dropped, one ONNX
  NonMaxSuppression made class-aware the way torchvision's batched_nms does it (each class's boxes
  shifted into a coordinate region of their own, so classes never suppress each other), the max_det
  highest kept: trainer.postprocess.non_max_suppression, operator for operator. (Per-class
  NonMaxSuppression over a [B, nc, N] score tensor gave the same boxes but cost ~4% of a 320 frame.)
- `--dynamic`: batch, H and W are dynamic (H, W any stride multiple up to imgsz). Otherwise all static.
- `--raw`: the plain head instead: float NCHW `images` in 0..1 -> `output0` [B, 4+nc, N] (ultralytics' layout).
- metadata_props: `yolov12_serve` (EngineInfo as JSON) plus readable keys (engines.metadata.info_to_props).

Exporter: `torch.onnx.export(dynamo=False)`, the TorchScript tracer. In torch 2.14 the default dynamo
exporter needs `onnxscript` (not a dependency: it failed here with ModuleNotFoundError) and has no
equivalent of an autograd Function's `symbolic`, which is how NonMaxSuppression and TensorRT's
EfficientNMS_TRT plugin node are emitted; the tracer also keeps the shape arithmetic of area attention
dynamic, which dynamic H/W needs. BatchNorm is fused first, and flash-attn is never traced
(trainer.nn.attention checks torch.onnx.is_in_onnx_export and the export runs on the CPU unless a GPU is asked for).
"""

from __future__ import annotations

import copy
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .boxes import xywh2xyxy
from .nn import DetectionModel

__all__ = ["End2End", "ExportError", "export", "export_main", "export_onnx", "fold_input_scale"]

OPSET = 17  # NonMaxSuppression, TopK, ScatterND; read by ONNX Runtime >= 1.12 and TensorRT 8.6 / 10
NMS_KINDS = ("onnx", "efficient")


class ExportError(ValueError):
    """Export options that cannot work together; the message says what to change."""


# ----------------------------------------------------------------------------- NMS nodes
class _OnnxNMS(torch.autograd.Function):
    """ONNX NonMaxSuppression: boxes [B,N,4] xyxy, scores [B,C,N] -> selected (batch, class, box) [K,3] int64.

    `forward` computes the same with torchvision so tracing sees real values; `symbolic` emits the ONNX op
    (TensorRT parses it into its INMSLayer).
    """

    @staticmethod
    def forward(ctx: Any, boxes: torch.Tensor, scores: torch.Tensor, max_out: int, iou: float,
                conf: float) -> torch.Tensor:
        from torchvision.ops import nms

        rows = []
        for b in range(scores.shape[0]):
            for c in range(scores.shape[1]):
                idx = (scores[b, c] > conf).nonzero(as_tuple=True)[0]
                keep = idx[nms(boxes[b, idx].float(), scores[b, c, idx].float(), iou)][:max_out]
                rows.append(torch.stack((torch.full_like(keep, b), torch.full_like(keep, c), keep), 1))
        return torch.cat(rows).to(torch.int64) if rows else torch.zeros(0, 3, dtype=torch.int64)

    @staticmethod
    def symbolic(g: Any, boxes: Any, scores: Any, max_out: int, iou: float, conf: float) -> Any:
        return g.op("NonMaxSuppression", boxes, scores,
                    g.op("Constant", value_t=torch.tensor([max_out], dtype=torch.int64)),
                    g.op("Constant", value_t=torch.tensor([iou], dtype=torch.float32)),
                    g.op("Constant", value_t=torch.tensor([conf], dtype=torch.float32)),
                    center_point_box_i=0)


class _EfficientNMS(torch.autograd.Function):
    """TensorRT's EfficientNMS_TRT plugin: boxes [B,N,4], scores [B,N,C] -> (count, boxes, scores, classes).

    Only TensorRT runs this node; `forward` reproduces its outputs (per-class NMS, best max_det) for tracing.
    """

    @staticmethod
    def forward(ctx: Any, boxes: torch.Tensor, scores: torch.Tensor, max_out: int, iou: float,
                conf: float) -> tuple[torch.Tensor, ...]:
        sel = _OnnxNMS.forward(ctx, boxes, scores.transpose(1, 2), max_out, iou, conf)
        b_n = scores.shape[0]
        num = torch.zeros(b_n, 1, dtype=torch.int32)
        out_boxes = torch.zeros(b_n, max_out, 4, dtype=boxes.dtype)
        out_scores = torch.zeros(b_n, max_out, dtype=scores.dtype)
        out_classes = torch.zeros(b_n, max_out, dtype=torch.int32)
        for b in range(b_n):
            mine = sel[sel[:, 0] == b]
            s = scores[b, mine[:, 2], mine[:, 1]]
            order = s.argsort(descending=True)[:max_out]
            k = len(order)
            num[b, 0] = k
            out_boxes[b, :k] = boxes[b, mine[order, 2]]
            out_scores[b, :k] = s[order]
            out_classes[b, :k] = mine[order, 1].to(torch.int32)
        return num, out_boxes, out_scores, out_classes

    @staticmethod
    def symbolic(g: Any, boxes: Any, scores: Any, max_out: int, iou: float, conf: float) -> Any:
        return g.op("TRT::EfficientNMS_TRT", boxes, scores, background_class_i=-1, box_coding_i=0,
                    iou_threshold_f=iou, max_output_boxes_i=max_out, plugin_version_s="1", score_activation_i=0,
                    score_threshold_f=conf, class_agnostic_i=0, outputs=4)


# ----------------------------------------------------------------------------- the exported module
class End2End(nn.Module):
    """uint8 NHWC images -> [B, max_det, 6] detections: the model, box decoding and class-aware NMS in one graph."""

    def __init__(self, model: DetectionModel, conf: float = 0.25, iou: float = 0.7, max_det: int = 300,
                 nms: str = "onnx", scale_folded: bool = False) -> None:
        super().__init__()
        self.model, self.conf, self.iou, self.max_det, self.nms = model, conf, iou, max_det, nms
        self.scale_folded = scale_folded  # the first conv's weights already hold the 1/255 (fold_input_scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        x = images.to(dtype) if self.scale_folded else images.to(dtype) / 255
        # cast first, then NHWC -> NCHW: ONNX Runtime folds a float transpose that feeds the first convolution
        # into its layout change (ReorderInput), where a uint8 transpose would run on its own, slowly
        pred = self.model(x.permute(0, 3, 1, 2)).float()  # [B, 4+nc, N]
        boxes = xywh2xyxy(pred[:, :4].transpose(1, 2))  # [B, N, 4]
        cls = pred[:, 4:]  # [B, nc, N]
        score, label = cls.max(1)  # the best class per anchor, as trainer.postprocess does
        if self.nms == "efficient":
            classes = torch.arange(cls.shape[1], device=cls.device).view(1, -1, 1)
            return self._efficient(boxes, cls * (label.unsqueeze(1) == classes).to(cls.dtype))
        # class-aware NMS as one NMS over all boxes, each class shifted into a region of its own (torchvision's
        # batched_nms trick): no [B, nc, N] score tensor and one pass instead of nc. In FP32 whatever the model's
        # precision (`pred` was cast above; engines.build pins these layers in FP16 TensorRT builds): the offsets
        # reach class x span, thousands of pixels, where FP16's spacing is 4-8 px
        span = boxes.max() - boxes.min() + 1
        shifted = boxes + (label.to(boxes.dtype) * span).unsqueeze(-1)
        sel = _OnnxNMS.apply(shifted, score.unsqueeze(1), self.max_det, self.iou, self.conf)  # [K, 3] (batch, 0, box)
        keep = torch.zeros_like(score)
        keep[sel[:, 0], sel[:, 2]] = 1.0
        # the max_det best survivors; zero columns appended so TopK always has max_det candidates
        pad = torch.zeros_like(score[:, :1]).expand(-1, self.max_det)
        top, idx = torch.cat((score * keep, pad), 1).topk(self.max_det, dim=1)
        valid = torch.cat((keep, pad), 1).gather(1, idx).unsqueeze(-1)
        box_pad = torch.zeros_like(boxes[:, :1]).expand(-1, self.max_det, -1)
        top_boxes = torch.cat((boxes, box_pad), 1).gather(1, idx.unsqueeze(-1).expand(-1, -1, 4))
        top_labels = torch.cat((label.to(score.dtype), pad), 1).gather(1, idx)
        return torch.cat((top_boxes, top.unsqueeze(-1), top_labels.unsqueeze(-1)), 2) * valid

    def _efficient(self, boxes: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        num, out_boxes, out_scores, out_classes = _EfficientNMS.apply(
            boxes, masked.transpose(1, 2).contiguous(), self.max_det, self.iou, self.conf)
        rows = torch.arange(self.max_det, device=boxes.device).view(1, -1)
        valid = (rows < num.to(rows.dtype)).unsqueeze(-1).to(out_boxes.dtype)
        det = torch.cat((out_boxes, out_scores.unsqueeze(-1), out_classes.unsqueeze(-1).to(out_boxes.dtype)), 2)
        return det * valid


def fold_input_scale(model: DetectionModel) -> DetectionModel:
    """Divide the first convolution's weights by 255 (in place), so it takes 0..255 pixels: conv(x / 255) with
    no division in the graph (one pass over every input pixel saved). Zero padding is unaffected."""
    first = model.model[0].conv
    if not isinstance(first, nn.Conv2d):
        raise ExportError(f"the first layer is {type(first).__name__}, not a convolution: cannot fold the 1/255")
    with torch.no_grad():
        first.weight.div_(255)
    return model


# ----------------------------------------------------------------------------- options
def _imgsz(imgsz: int | tuple[int, int] | list[int], stride: int) -> tuple[int, int]:
    size = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(int(x) for x in imgsz)
    if len(size) == 1:
        size = (size[0], size[0])
    if len(size) != 2 or min(size) <= 0:
        raise ExportError(f"imgsz {imgsz}: give one size (640) or height,width (384,640)")
    bad = [s for s in size if s % stride]
    if bad:
        fix = ",".join(str(max(stride, round(s / stride) * stride)) for s in size)
        raise ExportError(f"imgsz {size[0]}x{size[1]} is not a multiple of the model stride {stride}: use {fix}")
    return size  # type: ignore[return-value]


def _check_options(*, format: str, batch: int, half: bool, int8: bool, data: str | Path | None, conf: float,
                   iou: float, max_det: int, raw: bool, nms: str) -> None:
    if format not in ("onnx", "engine"):
        raise ExportError(f"unknown format '{format}': use 'onnx' (ONNX Runtime, CPU) or 'engine' (TensorRT)")
    if batch < 1:
        raise ExportError(f"batch must be >= 1, got {batch}")
    if not 0 <= conf < 1:
        raise ExportError(f"conf must be in [0, 1), got {conf}")
    if not 0 < iou <= 1:
        raise ExportError(f"iou must be in (0, 1], got {iou}")
    if not 1 <= max_det <= 3840:  # TensorRT's TopK limit
        raise ExportError(f"max_det must be in 1..3840, got {max_det}")
    if nms not in NMS_KINDS:
        raise ExportError(f"unknown nms '{nms}': use 'onnx' (NonMaxSuppression) or 'efficient' (TensorRT plugin)")
    if int8 and format != "engine":
        raise ExportError("int8 needs TensorRT calibration: use --format engine --int8 --data data.yaml")
    if int8 and not data:
        raise ExportError("int8 needs calibration images: add --data data.yaml (its val images are used)")
    if half and int8:
        raise ExportError("choose one of --half and --int8 (INT8 engines keep FP16 for the layers INT8 cannot take)")
    if nms == "efficient" and format == "onnx" and not raw:
        raise ExportError("nms='efficient' is a TensorRT plugin that ONNX Runtime cannot run: use it with "
                          "--format engine, or keep nms='onnx'")


def _load(yolo: Any) -> tuple[DetectionModel, int | None, Path | None]:
    """(model, training imgsz if known, source file) from a YOLO, a DetectionModel or a path."""
    from .yolo import YOLO

    if isinstance(yolo, str | Path):
        yolo = YOLO(yolo)
    if isinstance(yolo, DetectionModel):
        return yolo, None, None
    if isinstance(yolo, YOLO):
        imgsz = yolo.ckpt.imgsz if yolo.ckpt is not None else None
        src = Path(yolo.source) if yolo.source.endswith((".pt", ".pth", ".yaml", ".yml")) else None
        return yolo.model, imgsz, src
    raise ExportError(f"cannot export a {type(yolo).__name__}: pass a YOLO, a DetectionModel or a checkpoint path")


def _device(device: str | int | None) -> torch.device:
    if device is None or str(device).lower() == "cpu":
        return torch.device("cpu")
    d = str(device).lower().removeprefix("cuda:")
    d = "0" if d == "cuda" else d
    if not d.isdigit():
        raise ExportError(f"unknown device '{device}': use cpu, 0 or cuda:0")
    if not torch.cuda.is_available() or int(d) >= torch.cuda.device_count():
        raise ExportError(f"device {device} asked for but CUDA sees {torch.cuda.device_count()} GPU(s): "
                          "use --device cpu")
    return torch.device(f"cuda:{d}")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("yolov12-serve")
    except Exception:
        from . import __version__

        return __version__


# ----------------------------------------------------------------------------- ONNX
def export_onnx(model: DetectionModel, path: str | Path, imgsz: tuple[int, int], *, batch: int = 1,
                dynamic: bool = False, half: bool = False, conf: float = 0.25, iou: float = 0.7,
                max_det: int = 300, raw: bool = False, simplify: bool = True, nms: str = "onnx",
                device: torch.device | None = None) -> Path:
    """Trace `model` (fused copy) to ONNX at `path`, simplified, with EngineInfo in its metadata_props."""
    import onnx

    from engines.base import EngineInfo
    from engines.metadata import info_to_props

    device = device or torch.device("cpu")
    path = Path(path)
    if path.is_dir():  # said before the trace (seconds at 640), not after it as the rename's errno
        raise ExportError(f"output '{path}' is a folder: name a file, e.g. {path / 'model.onnx'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    stride = int(max(model.stride))
    net = copy.deepcopy(model).float().eval().fuse().to(device)
    if half:
        net = net.half()
    for p in net.parameters():
        p.requires_grad_(False)
    h, w = imgsz
    # dynamic graphs are traced on a small example (2 images, 4 strides square): every size is symbolic, and
    # tracing runs the model once, which at 640 costs seconds; batch > 1 so no batch-1 special case is traced in
    example_batch = 2 if dynamic else batch
    th, tw = (min(h, 4 * stride), min(w, 4 * stride)) if dynamic else (h, w)
    if raw:
        wrapper: nn.Module = net
        example = torch.zeros(example_batch, 3, th, tw, dtype=torch.float16 if half else torch.float32, device=device)
        names_in, names_out = ["images"], ["output0"]
        axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 2: "anchors"}}
    else:
        wrapper = End2End(fold_input_scale(net), conf, iou, max_det, nms, scale_folded=True).eval()
        example = torch.randint(0, 255, (example_batch, th, tw, 3), dtype=torch.uint8, device=device)
        names_in, names_out = ["images"], ["detections"]
        axes = {"images": {0: "batch", 1: "height", 2: "width"}, "detections": {0: "batch"}}
    tmp, tmp_out = path.with_suffix(".tmp.onnx"), path.with_suffix(path.suffix + ".tmp")
    try:
        # The tracer warns of each shape it turns into a constant (area attention's reshapes, the anchor grid); the
        # dynamic axes keep the graph general, as the tests check by running it at other sizes: not the user's concern.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(wrapper, (example,), str(tmp), dynamo=False, opset_version=OPSET, input_names=names_in,
                              output_names=names_out, dynamic_axes=axes if dynamic else None, do_constant_folding=True)
        proto = onnx.load(str(tmp))
        if simplify:
            import onnxslim

            proto = onnxslim.slim(proto)
        spec = model.spec
        max_batch = (batch if batch > 1 else 32) if dynamic else batch  # --dynamic alone: batches of 1..32
        info = EngineInfo(
            names={int(k): str(v) for k, v in model.names.items()}, imgsz=(h, w), stride=stride,
            batch=(1, max_batch) if dynamic else (batch, batch), dynamic_hw=dynamic,
            precision="fp16" if half else "fp32",
            variant=spec.variant, scale=spec.scale, conf=conf, iou=iou, max_det=max_det, version=_version(),
            extra={"layout": "raw" if raw else "end2end", "nms": None if raw else nms, "opset": OPSET,
                   "input": "float-nchw" if raw else "uint8-nhwc", "source": "yolov12-serve"},
        )
        _name_output_dims(proto, ["batch", 4 + model.nc, "anchors"] if raw else ["batch", max_det, 6], dynamic)
        del proto.metadata_props[:]
        for k, v in info_to_props(info).items():
            proto.metadata_props.add(key=k, value=v)
        if nms != "efficient":
            onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp_out))
        tmp_out.replace(path)
        return path
    finally:  # a failed trace or save leaves no half-written model (10 MB at n) beside the user's files
        tmp.unlink(missing_ok=True)
        tmp_out.unlink(missing_ok=True)


def _name_output_dims(proto: Any, dims: list[int | str], dynamic: bool) -> None:
    """Write the output's known sizes (shape inference and onnxslim leave some symbolic, e.g. max_det)."""
    out = proto.graph.output[0].type.tensor_type.shape.dim
    for d, want in zip(out, dims):
        if isinstance(want, int):
            d.dim_value = want
        elif dynamic:
            d.dim_param = want


# ----------------------------------------------------------------------------- entry points
def export(yolo: Any, format: str = "onnx", imgsz: int | tuple[int, int] | None = None, batch: int = 1,
           dynamic: bool = False, half: bool = False, int8: bool = False, data: str | Path | None = None,
           conf: float = 0.25, iou: float = 0.7, max_det: int = 300, raw: bool = False, simplify: bool = True,
           output: str | Path | None = None, device: str | int | None = None, workspace: float = 4,
           nms: str = "onnx", shapes: list[tuple[int, int]] | None = None, contexts: int = 2,
           timing_cache: str | Path | None = None, calib_cache: str | Path | None = None) -> Path:
    """Export `yolo` (a YOLO, DetectionModel or checkpoint path) to ONNX or a TensorRT engine; returns the file.

    imgsz: the largest input (int or (h, w)); default the training size, else 640. batch: the fixed batch,
    or with `dynamic` the largest (TensorRT's profile max; --dynamic alone records 32). `format='engine'`
    also takes workspace (GiB), nms ('onnx' = TensorRT's NMS layer, 'efficient' = EfficientNMS plugin),
    shapes (camera input shapes to optimise for, e.g. [(640, 640), (384, 640)]), contexts (execution
    contexts that will run at once), timing_cache and calib_cache (files reused between builds).
    """
    _check_options(format=format, batch=batch, half=half, int8=int8, data=data, conf=conf, iou=iou,
                   max_det=max_det, raw=raw, nms=nms)
    model, train_imgsz, source = _load(yolo)
    stride = int(max(model.stride))
    size = _imgsz(imgsz if imgsz is not None else (train_imgsz or 640), stride)
    suffix = ".onnx" if format == "onnx" else ".engine"
    if output is None:
        stem = source.stem if source is not None else f"yolov12{model.spec.scale}"
        output = (source.parent if source is not None and source.suffix in (".pt", ".pth") else Path.cwd()) / stem
        output = Path(output).with_suffix(suffix)
    output = Path(output)
    if format == "onnx":
        if output.suffix.lower() != ".onnx":
            raise ExportError(f"output '{output}' should end in .onnx for --format onnx")
        if half and _device(device).type == "cpu":  # ONNX Runtime on the CPU runs fp16 slower than fp32
            raise ExportError("fp16 ONNX is traced on a GPU: add --device 0, or export fp32 (TensorRT builds FP16 "
                              "from it with --format engine --half)")
        return export_onnx(model, output, size, batch=batch, dynamic=dynamic, half=half, conf=conf, iou=iou,
                           max_det=max_det, raw=raw, simplify=simplify, nms=nms, device=_device(device))
    if output.suffix.lower() not in (".engine", ".plan"):
        raise ExportError(f"output '{output}' should end in .engine (or .plan) for --format engine")
    from engines.build import BuildOptions, build_engine, tensorrt_major

    trt_major = tensorrt_major()  # first: without TensorRT nothing is written
    dev = _device(device if device is not None else 0)
    fp16_onnx = half and trt_major >= 11  # TensorRT 11 builds strongly typed: precision comes from the ONNX
    opts = BuildOptions(half=half, int8=int8, data=data, calib_images=_calibration_images(data) if int8 else None,
                        batch=32 if dynamic and batch == 1 else batch,  # as the ONNX records: --dynamic alone is 1..32
                        dynamic=dynamic, shapes=shapes, workspace_gib=workspace, contexts=contexts,
                        timing_cache=timing_cache, calib_cache=calib_cache, device=dev.index or 0)
    output.parent.mkdir(parents=True, exist_ok=True)
    # The ONNX that TensorRT parses is built for it (static batch, plugin NMS, fp16 under TensorRT 11): it goes in
    # a folder of its own beside the engine and is deleted after, never over the user's `<stem>.onnx`.
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as work:
        onnx_path = export_onnx(model, Path(work) / (output.stem + ".onnx"), size, batch=batch, dynamic=dynamic,
                                half=fp16_onnx, conf=conf, iou=iou, max_det=max_det, raw=raw, simplify=simplify,
                                nms=nms, device=dev)
        return build_engine(onnx_path, output, opts)


def _calibration_images(data: str | Path | None) -> list[Path]:
    """INT8 calibration images: the dataset's val split (its train split when it has no val)."""
    from .data.config import load_data_config

    cfg = load_data_config(data)
    split = "val" if "val" in cfg.splits else "train"
    return cfg.images(split)


def _parse_imgsz(values: list[str]) -> int | tuple[int, int]:
    parts = [p for v in values for p in v.replace("x", ",").split(",") if p]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ExportError(f"--imgsz {' '.join(values)}: give 640, or height,width like 384,640") from None
    if len(nums) == 1:
        return nums[0]
    if len(nums) == 2:
        return nums[0], nums[1]
    raise ExportError(f"--imgsz {' '.join(values)}: give 640, or height,width like 384,640")


def _parse_shapes(text: str | None) -> list[tuple[int, int]] | None:
    if not text:
        return None
    out = []
    for item in text.split(","):
        try:
            h, w = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise ExportError(f"--shapes '{text}': give HxW pairs like 640x640,384x640") from None
        out.append((h, w))
    return out


def export_main(argv: list[str] | None = None) -> int:
    """yolov12-export: the CLI of `export`; prints the written path, or one error line and exits 2."""
    from .cli import OneLineParser

    p = OneLineParser(prog="yolov12-export", description="Export a checkpoint to ONNX or a TensorRT engine.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--weights", required=True, help="checkpoint (.pt) or model yaml (random weights)")
    p.add_argument("--format", default="onnx", choices=["onnx", "engine"],
                   help="onnx (ONNX Runtime, CPU or GPU) or engine (TensorRT) (default: %(default)s)")
    p.add_argument("--imgsz", nargs="+", default=None, help="640, or height,width (default: the training size)")
    p.add_argument("--batch", type=int, default=1,
                   help="fixed batch (default: %(default)s), or the largest with --dynamic (default: 32)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width")
    p.add_argument("--half", action="store_true", help="FP16 (TensorRT)")
    p.add_argument("--int8", action="store_true", help="INT8 with calibration on --data (TensorRT)")
    p.add_argument("--data", default=None, help="data.yaml whose images calibrate INT8")
    p.add_argument("--conf", type=float, default=0.25,
                   help="score threshold of the NMS in the graph, in [0, 1) (default: %(default)s)")
    p.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold, in (0, 1] (default: %(default)s)")
    p.add_argument("--max-det", type=int, default=300,
                   help="most detections per image, 1..3840 (default: %(default)s)")
    p.add_argument("--raw", action="store_true", help="plain [B, 4+nc, N] head, float NCHW input (no NMS)")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxslim")
    p.add_argument("--nms", default="onnx", choices=list(NMS_KINDS),
                   help="TensorRT: NMS layer (onnx) or EfficientNMS (efficient) (default: %(default)s)")
    p.add_argument("--shapes", default=None, help="TensorRT: camera input shapes, e.g. 640x640,384x640")
    p.add_argument("--contexts", type=int, default=2,
                   help="TensorRT: execution contexts run at once (default: %(default)s)")
    p.add_argument("--workspace", type=float, default=4, help="TensorRT workspace limit, GiB (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, 0, cuda:0 (engine builds default to GPU 0)")
    p.add_argument("--output", default=None, help="output file (default: beside the weights)")
    try:
        a = p.parse_args(argv)
        path = export(a.weights, format=a.format, imgsz=_parse_imgsz(a.imgsz) if a.imgsz else None, batch=a.batch,
                      dynamic=a.dynamic, half=a.half, int8=a.int8, data=a.data, conf=a.conf, iou=a.iou,
                      max_det=a.max_det, raw=a.raw, simplify=not a.no_simplify, output=a.output, device=a.device,
                      workspace=a.workspace, nms=a.nms, shapes=_parse_shapes(a.shapes), contexts=a.contexts)
    except SystemExit as e:  # --help, or a bad option (said in one line)
        return int(e.code or 0)
    except Exception as e:
        from engines.base import EngineError

        from .checkpoint import CheckpointError

        if not isinstance(e, ExportError | EngineError | CheckpointError | OSError | ValueError):
            raise
        print(f"yolov12-export: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(export_main())
