"""Build a TensorRT engine from our ONNX export (TensorRT 10 Python API), metadata header included.

- precision: FP32, FP16 (`half`), or INT8 (`int8`) calibrated by an entropy calibrator over the
  dataset's images letterboxed as at run time, with a reusable calibration cache; in INT8 the
  head's sigmoid stays FP32 so scores keep their calibration. Everything after the model (box
  decoding, the class offsets of the class-aware NMS, NMS, top-k) stays FP32 in FP16 and INT8
  builds: the offsets are class index x a span of hundreds of pixels, where FP16's spacing is
  4-8 px, enough to merge or split small defects. TensorRT >= 11 builds strongly typed
  networks: FP16 then comes from an fp16 ONNX (trainer.export does that, its post-processing
  typed FP32) and INT8 calibration no longer exists.
- shapes: with a dynamic export, one optimisation profile per camera shape asked for (e.g.
  640x640 and 384x640; default imgsz with any smaller stride multiple), batch min 1, opt and max
  `batch`; the whole set repeated `contexts` times, because every execution context running at
  once needs profiles of its own.
- a timing cache (reused across builds: much faster rebuilds), a workspace limit, and the NMS
  chosen at export (ONNX NonMaxSuppression -> TensorRT's INMSLayer, or the EfficientNMS plugin).

The file written is a 4-byte little-endian length, the JSON EngineInfo, then the plan.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import EngineError, EngineInfo
from .metadata import read_info, write_engine_file
from .tensorrt import import_tensorrt, make_logger

__all__ = ["BuildOptions", "build_engine", "keep_postprocess_fp32", "profile_shapes", "tensorrt_major"]


@dataclass
class BuildOptions:
    """How to build: precision, batch and shapes, concurrency, caches, GPU."""

    half: bool = False
    int8: bool = False
    calib_images: list[Path] | None = None  # images for INT8 calibration (trainer.export reads them from data.yaml)
    calib_cache: str | Path | None = None  # default: <output>.calib beside the engine
    batch: int = 1  # fixed batch, or the profile's opt and max batch when dynamic
    dynamic: bool = False
    shapes: list[tuple[int, int]] | None = None  # camera input shapes (h, w) to optimise for
    contexts: int = 2  # execution contexts that may run at once (dynamic engines: a profile set each)
    workspace_gib: float = 4.0
    timing_cache: str | Path | None = None  # default: <output>.timing beside the engine
    device: int = 0
    data: str | Path | None = None  # recorded only; calib_images carry the files


def tensorrt_major() -> int:
    """Major version of the installed TensorRT (EngineError saying how to install it when missing)."""
    return int(import_tensorrt().__version__.split(".")[0])


def _nhwc(info: EngineInfo) -> bool:
    """Our end-to-end exports take uint8 NHWC frames; raw-head exports (the ultralytics layout) float NCHW."""
    return info.extra.get("input", "float-nchw") == "uint8-nhwc"


def profile_shapes(info: EngineInfo, opts: BuildOptions) -> list[tuple[tuple[int, ...], ...]]:
    """(min, opt, max) input shapes of the profiles of one context's set (NHWC, or NCHW for a raw-head export),
    validated against the export."""
    h0, w0 = info.imgsz
    s = info.stride
    b = opts.batch

    def shape(n: int, h: int, w: int) -> tuple[int, ...]:
        return (n, h, w, 3) if _nhwc(info) else (n, 3, h, w)

    if not info.dynamic_hw:
        if opts.shapes and any(tuple(x) != (h0, w0) for x in opts.shapes):
            raise EngineError(f"--shapes need a dynamic export: the ONNX is fixed at {h0}x{w0} (add --dynamic)")
        fixed = shape(info.batch[0], h0, w0)
        return [(fixed, fixed, fixed)]
    if not opts.shapes:  # any stride multiple up to imgsz, tuned for imgsz
        return [(shape(1, s, s), shape(b, h0, w0), shape(b, h0, w0))]
    out = []
    for h, w in opts.shapes:
        if h % s or w % s or h > h0 or w > w0:
            raise EngineError(f"shape {h}x{w}: must be multiples of {s} within the export's {h0}x{w0}")
        out.append((shape(1, h, w), shape(b, h, w), shape(b, h, w)))
    return out


def _keep_head_sigmoid_fp32(trt: Any, network: Any) -> int:
    """In INT8 builds pin the head's class Sigmoid to FP32 (scores keep their calibration); returns how many.

    The head is the highest-numbered `model.N`; its class sigmoid is the one directly under it
    (`/model.21/Sigmoid`), unlike the SiLU sigmoids inside its convolutions (`/model.21/cv2.0/.../act/Sigmoid`).
    """
    found = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        m = re.search(r"/model\.(\d+)/Sigmoid[^/]*$", layer.name)
        if m and layer.type == trt.LayerType.ACTIVATION:
            found.append((int(m.group(1)), layer))
    head = max((i for i, _ in found), default=-1)
    pinned = [layer for i, layer in found if i == head]
    for layer in pinned:
        layer.precision = trt.float32
        layer.set_output_type(0, trt.float32)
    return len(pinned)


MODEL_SCOPE = "/model/"  # names of the model's own nodes (trainer.export's End2End.model); the rest wraps it


def keep_postprocess_fp32(trt: Any, network: Any) -> int:
    """Pin every layer after the model's last one (box decoding, class offsets, NMS, top-k: trainer.export's End2End
    after `self.model`) to FP32, those with a float output; returns how many. The parser adds layers in the ONNX
    graph's order, which the tracer wrote in execution order; the model's layers carry its scope in their
    names. A weakly typed FP16 / INT8 build may otherwise run them in FP16 (TensorRT < 11; 11 obeys the ONNX's
    types, which keep them FP32)."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    last = max((i for i, layer in enumerate(layers) if layer.name.startswith(MODEL_SCOPE)), default=None)
    if last is None:
        return 0
    floats = {trt.float32, trt.float16}
    pinned = 0
    for layer in layers[last + 1:]:
        outs = [k for k in range(layer.num_outputs) if layer.get_output(k).dtype in floats]
        if not outs:
            continue
        layer.precision = trt.float32
        for k in outs:
            layer.set_output_type(k, trt.float32)
        pinned += 1
    return pinned


def build_engine(onnx_path: str | Path, output: str | Path, opts: BuildOptions) -> Path:
    """Build `output` (.engine) from our ONNX export at `onnx_path`; returns the engine path."""
    import torch

    trt = import_tensorrt()
    major = int(trt.__version__.split(".")[0])
    onnx_path, output = Path(onnx_path), Path(output)
    info = read_info(onnx_path)
    if opts.int8 and major >= 11:
        raise EngineError(f"TensorRT {trt.__version__} removed INT8 calibration (strongly typed only): build --int8 "
                          "with TensorRT 10, or use --half")
    if opts.int8 and not opts.calib_images and not Path(opts.calib_cache or output.with_suffix(".calib")).is_file():
        raise EngineError("INT8 needs calibration images: --data data.yaml (or an existing calibration cache)")
    if opts.contexts < 1:
        raise EngineError(f"contexts must be >= 1, got {opts.contexts}")
    if not torch.cuda.is_available():
        raise EngineError("building a TensorRT engine needs a CUDA GPU; none is visible to torch")
    device = torch.device(f"cuda:{opts.device}")
    shapes = profile_shapes(info, opts)
    logger = make_logger(trt)
    mark = len(logger.errors)  # the shared logger's errors from here on are this build's
    with torch.cuda.device(device):
        builder = trt.Builder(logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if major >= 11 else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
            raise EngineError(f"TensorRT cannot parse {onnx_path}: {errors or 'no reason given'}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gib * (1 << 30)))
        timing_file = Path(opts.timing_cache or output.with_suffix(".timing"))
        cache = config.create_timing_cache(timing_file.read_bytes() if timing_file.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        if major < 11 and (opts.half or opts.int8):
            config.set_flag(trt.BuilderFlag.FP16)  # INT8 builds fall back to FP16, not FP32, where INT8 cannot go
            if keep_postprocess_fp32(trt, network):  # the NMS class offsets: see the module's docstring
                config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        name = network.get_input(0).name
        if info.dynamic_hw or -1 in tuple(network.get_input(0).shape):
            for _ in range(opts.contexts):
                for lo, opt, hi in shapes:
                    profile = builder.create_optimization_profile()
                    profile.set_shape(name, min=lo, opt=opt, max=hi)
                    config.add_optimization_profile(profile)
        if opts.int8:
            from .calibration import CalibrationBatches, make_calibrator

            config.set_flag(trt.BuilderFlag.INT8)
            _, opt_shape, _ = shapes[0]  # TensorRT 10 calibrates at the first profile's opt shape: its batch too
            hw = (opt_shape[1], opt_shape[2]) if _nhwc(info) else (opt_shape[2], opt_shape[3])
            batches = CalibrationBatches(opts.calib_images or [], hw, batch=opt_shape[0], exact_batch=True) \
                if opts.calib_images else _CacheOnly(opt_shape[0], hw)
            calib_cache = Path(opts.calib_cache or output.with_suffix(".calib"))
            calibrator = make_calibrator(trt, batches, calib_cache, device, nhwc=_nhwc(info))
            config.int8_calibrator = calibrator
            if _keep_head_sigmoid_fp32(trt, network):
                config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        plan = builder.build_serialized_network(network, config)
        if opts.int8 and calibrator.error is not None:  # raised inside get_batch, where TensorRT only logs it
            raise calibrator.error
        if plan is None:
            raise EngineError(f"TensorRT build failed: {' '.join(logger.errors[mark:][-3:]) or 'see the log above'}")
        timing_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    props = torch.cuda.get_device_properties(device)
    precision = "int8" if opts.int8 else "fp16" if opts.half else "fp32"
    dynamic = info.dynamic_hw
    extra = {**info.extra, "tensorrt": trt.__version__, "gpu": props.name,
             "compute_capability": f"{props.major}.{props.minor}", "contexts": opts.contexts if dynamic else None,
             "profiles_per_context": len(shapes) if dynamic else 0,
             "shapes": [list(hw) for hw in opts.shapes] if opts.shapes else None,
             "data": str(opts.data) if opts.data else None}
    built = dataclasses.replace(info, precision=precision, batch=(1, opts.batch) if dynamic else info.batch,
                                extra=extra)
    return write_engine_file(output, built, plan)


class _CacheOnly:
    """Stand-in batches when only a calibration cache is reused: TensorRT reads the cache, asks for no images."""

    def __init__(self, batch: int, input_hw: tuple[int, int]) -> None:
        self.batch, self.input_hw = batch, input_hw

    def __iter__(self) -> Any:
        return iter(())
