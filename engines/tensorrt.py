"""TensorRT backend: one deserialised engine per GPU, K execution contexts, each with its own CUDA stream.

I/O buffers are torch CUDA tensors (no pycuda: one CUDA context shared with the pre-processing,
nothing compiled at install). Each context owns input/output buffers sized for the largest shape
its profiles allow and bound once with `set_tensor_address`; a call views them at the batch's
shape, `set_input_shape`s it and runs `execute_async_v3` on the context's stream. Where the
engine has no data-dependent layers (raw head, or the EfficientNMS plugin; TensorRT's own NMS
layer syncs with the host) each (profile, shape) is captured in a CUDA graph after its first run.

With dynamic shapes TensorRT needs one optimisation profile per concurrently running context:
our builder adds a profile set per context (`--contexts`), and a context switches between the
profiles of its set (one per camera shape) with `set_optimization_profile_async`. An engine with fewer
sets than the instances asked for (ultralytics' dynamic engines have one profile) serves with as many
contexts as it has sets and says so at load (`instances` is then the smaller number: `context_slots`).
An engine built with `--shapes` takes those input shapes only: the server plans every camera within them
(engines.letterbox.pick_shape) and `check_batch` refuses any other before it runs. A static engine built
with `--batch 8` takes batches of 8 only: callers pad (engines.base.run_padded; the server's worker does).

Host-to-device copies go through a pinned staging buffer per context (pageable memory is copied by CUDA
through its own bounce buffer, synchronously), sized for the context's largest input; a context's next call
starts after its previous one synchronised on its outputs, so the buffer is never overwritten under a copy.

Files: our engines and ultralytics' (same header: 4-byte little-endian length + JSON + plan).
Written against the TensorRT 10 Python API; TensorRT is imported only when this backend is used.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .base import Engine, EngineError, EngineInfo, import_torch
from .metadata import check_graph, engine_header, info_from_metadata
from .nms import nms_torch
from .pool import InstancePool

__all__ = ["TensorRTEngine", "context_slots", "import_tensorrt", "make_logger"]

_NO_TRT = ("TensorRT is not installed (`import tensorrt` failed): install it from NVIDIA "
           "(`pip install tensorrt` with NVIDIA's index, or use an NVIDIA TensorRT container), "
           "or export ONNX and serve it with ONNX Runtime")


def import_tensorrt() -> Any:
    """The tensorrt module, or EngineError saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineError(_NO_TRT) from None
    return trt


_LOGGER: Any = None


def make_logger(trt: Any) -> Any:
    """The process's TensorRT logger, which also keeps its errors so a failure can be reported with TensorRT's
    reason (read `logger.errors[mark:]` from a mark taken before the call). One per process: TensorRT keeps the
    first logger it is given for good and warns about any other, so a second one would log nowhere and the
    first must outlive every builder and runtime. Registers TensorRT's plugins once (EfficientNMS_TRT: a
    plan using it does not deserialize in a fresh process without them)."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = _new_logger(trt)
        trt.init_libnvinfer_plugins(_LOGGER, "")
    return _LOGGER


def _new_logger(trt: Any) -> Any:
    errors = {trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR}

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in errors:
                self.errors.append(msg)
            if severity in errors or severity == trt.ILogger.Severity.WARNING:
                print(f"[TensorRT] {msg}")

    return _Logger()


def _nptype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int8: torch.int8, trt.bool: torch.bool}
    if hasattr(trt, "uint8"):
        table[trt.uint8] = torch.uint8
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    if dtype not in table:
        raise EngineError(f"engine tensor type {dtype} is not supported by this backend")
    return table[dtype]


def _check_target(info: EngineInfo, trt_version: str, gpu_name: str, capability: tuple[int, int], path: Path) -> None:
    """EngineError with the fix when the engine says it was built for another TensorRT or GPU architecture."""
    built_trt, built_cc = info.extra.get("tensorrt"), info.extra.get("compute_capability")
    rebuild = (f"rebuild it on this machine: yolov12-export --weights best.pt --format engine "
               f"(the .engine file '{path.name}' is tied to the TensorRT version and GPU it was built with)")
    if built_trt and built_trt != trt_version:
        raise EngineError(f"{path}: built with TensorRT {built_trt}, this is TensorRT {trt_version}: {rebuild}")
    here = f"{capability[0]}.{capability[1]}"
    if built_cc and str(built_cc) != here:
        raise EngineError(f"{path}: built for {info.extra.get('gpu', 'another GPU')} (compute capability {built_cc}), "
                          f"this is {gpu_name} ({here}): {rebuild}")


def context_slots(dynamic: bool, n_profiles: int, per_context: int | None, instances: int) -> int:
    """Execution contexts an engine can run at once for `instances` asked for: all of them for a static engine;
    with dynamic shapes one per optimisation-profile set (`per_context` profiles each: our builder's
    profiles_per_context; None: all profiles form one set, as in ultralytics' engines), never more than asked."""
    if instances < 1:
        raise EngineError(f"instances must be >= 1, got {instances}")
    if not dynamic:
        return instances
    per = per_context if per_context else max(n_profiles, 1)
    return max(1, min(instances, n_profiles // per))


@dataclass
class _Profile:
    index: int
    min: tuple[int, ...]
    max: tuple[int, ...]

    def fits(self, shape: tuple[int, ...]) -> bool:
        return all(lo <= s <= hi for s, lo, hi in zip(shape, self.min, self.max))


@dataclass
class _Context:
    """One execution context with its stream, buffers, profile set and captured graphs."""

    ctx: Any
    stream: Any
    profiles: list[_Profile]
    buffers: dict[str, Any]
    staging: Any = None  # pinned host memory for the input's H2D copy (sized like the input buffer)
    active: int | None = None
    graphs: dict[tuple, Any] = field(default_factory=dict)
    graphs_ok: bool = True
    last_key: tuple | None = None  # (profile, shape) of the context's last run


class TensorRTEngine(Engine):
    """A TensorRT `.engine` / `.plan` on one GPU with `instances` execution contexts."""

    def __init__(self, path: str | Path, device: str = "cuda:0", instances: int = 1, cuda_graphs: bool = True,
                 info: EngineInfo | None = None) -> None:
        torch = import_torch("a TensorRT engine (its input and output buffers are torch CUDA tensors)")
        trt = import_tensorrt()
        self.path = Path(path)
        if str(device).lower() == "cpu":
            raise EngineError("TensorRT engines run on a GPU: pass device='cuda:0' (or serve an .onnx on the CPU)")
        try:
            self._device = torch.device(device if ":" in str(device) or str(device) == "cuda" else f"cuda:{device}")
        except RuntimeError:
            raise EngineError(f"unknown device '{device}': use 'cuda:N'") from None
        if not torch.cuda.is_available() or (self._device.index or 0) >= torch.cuda.device_count():
            raise EngineError(f"device {device} asked for but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
        self.device, self.instances = str(self._device), instances
        offset, meta = engine_header(self.path)
        if not meta and info is None:
            raise EngineError(f"{self.path}: no metadata header before the plan: build it with "
                              "`yolov12-export --format engine` (or ultralytics' exporter)")
        self.info = info or info_from_metadata(meta, str(self.path))
        props = torch.cuda.get_device_properties(self._device)
        _check_target(self.info, trt.__version__, props.name, (props.major, props.minor), self.path)
        self._logger = make_logger(trt)
        with open(self.path, "rb") as f:
            f.seek(offset)
            plan = f.read()
        mark = len(self._logger.errors)
        with torch.cuda.device(self._device):
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            reason = " ".join(self._logger.errors[mark:][-3:]) or "no reason given"
            raise EngineError(f"{self.path}: TensorRT could not load the plan ({reason}). It was probably built with "
                              "another TensorRT version or for another GPU: rebuild it on this machine with "
                              "yolov12-export --format engine")
        self._trt = trt
        self._inputs, self._outputs = self._io_names(trt)
        self._input = self._inputs[0]
        self._in_dtype = _nptype(trt, self._engine.get_tensor_dtype(self._input))
        self._nhwc = self.info.extra.get("input", "float-nchw") == "uint8-nhwc"
        layout = self.info.extra.get("layout", "raw")
        self._raw = layout == "raw"
        self._output = "detections" if "detections" in self._outputs else self._outputs[0]
        check_graph(self.info, str(self.path), tuple(self._engine.get_tensor_shape(self._input)),
                    tuple(self._engine.get_tensor_shape(self._output)), nhwc=self._nhwc)  # dynamic dims are -1
        # the host-synchronising NMS layer cannot be captured; a raw head or the EfficientNMS plugin can
        self._graphs = cuda_graphs and (self._raw or self.info.extra.get("nms") == "efficient")
        self._capture_lock = threading.Lock()
        slots = self._context_slots(instances)
        if slots < instances:
            sets = self._engine.num_optimization_profiles
            print(f"[yolov12-serve] {self.path.name}: {instances} instances asked for but the engine has "
                  f"{sets} optimisation profile(s) ({slots} set(s): TensorRT runs one context per set at once); "
                  f"serving with {slots}. Rebuild with `yolov12-export --format engine --contexts {instances}` "
                  "for more.")
        self.instances = slots
        self._pool = InstancePool([self._make_context(k) for k in range(slots)])

    # ---- set-up
    def _io_names(self, trt: Any) -> tuple[list[str], list[str]]:
        ins, outs = [], []
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            (ins if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outs).append(name)
        if len(ins) != 1 or not outs:
            raise EngineError(f"{self.path}: expected one input and at least one output, got {ins} -> {outs}")
        return ins, outs

    def _dynamic(self) -> bool:
        return -1 in tuple(self._engine.get_tensor_shape(self._input))

    def _context_slots(self, instances: int) -> int:
        per = self.info.extra.get("profiles_per_context")
        return context_slots(self._dynamic(), self._engine.num_optimization_profiles, int(per) if per else None,
                             instances)

    def _profiles(self, slot: int) -> list[_Profile]:
        if not self._dynamic():
            shape = tuple(self._engine.get_tensor_shape(self._input))
            return [_Profile(0, shape, shape)]
        n = self._engine.num_optimization_profiles
        per_slot = int(self.info.extra.get("profiles_per_context") or n)
        out = []
        for p in range(slot * per_slot, (slot + 1) * per_slot):
            lo, _, hi = self._engine.get_tensor_profile_shape(self._input, p)
            out.append(_Profile(p, tuple(lo), tuple(hi)))
        return out

    def _make_context(self, slot: int) -> _Context:
        import torch

        with torch.cuda.device(self._device):
            ctx = self._engine.create_execution_context()
            if ctx is None:
                raise EngineError(f"{self.path}: TensorRT could not create execution context {slot} (out of GPU "
                                  "memory?): use fewer instances")
            stream = torch.cuda.Stream(self._device)
            profiles = self._profiles(slot)
            buffers: dict[str, Any] = {}
            # size every buffer for the largest shape any of this context's profiles allows
            sizes: dict[str, int] = {}
            for prof in profiles:
                if self._dynamic():
                    self._switch_profile(ctx, prof.index, stream)
                    ctx.set_input_shape(self._input, prof.max)
                for name in [self._input, *self._outputs]:
                    shape = tuple(ctx.get_tensor_shape(name))
                    if min(shape, default=1) < 0:
                        raise EngineError(f"{self.path}: output '{name}' has a data-dependent shape {shape}; "
                                          "export with yolov12-export (fixed [B, max_det, 6] output)")
                    sizes[name] = max(sizes.get(name, 0), math.prod(shape))
            for name, n in sizes.items():
                dtype = _nptype(self._trt, self._engine.get_tensor_dtype(name))
                buffers[name] = torch.empty(n, dtype=dtype, device=self._device)
                ctx.set_tensor_address(name, buffers[name].data_ptr())
            # the uint8 frames as they come (NHWC), pinned: a pageable source makes every copy synchronous
            staging = torch.empty(sizes[self._input], dtype=torch.uint8, pin_memory=True)
            stream.synchronize()
        return _Context(ctx, stream, profiles, buffers, staging,
                        active=profiles[-1].index if self._dynamic() else None)

    # ---- inference
    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        """uint8 [B, H, W, 3] RGB -> B float32 arrays [n, 6] (x1, y1, x2, y2, score, class) in input pixels."""
        import torch

        self.check_batch(batch)
        with self._pool.borrow() as c, torch.cuda.device(self._device), torch.cuda.stream(c.stream):
            b, h, w = batch.shape[:3]
            host = c.staging[:batch.size].view(b, h, w, 3)
            host.numpy()[...] = batch  # into pinned memory (the previous call's copy from it has completed)
            shape = (b, h, w, 3) if self._nhwc else (b, 3, h, w)
            prof = next((p for p in c.profiles if p.fits(shape)), None)
            if prof is None:
                allowed = ", ".join(f"{p.min}..{p.max}" for p in c.profiles)
                raise EngineError(f"input {shape} is outside the engine's optimisation profiles ({allowed}): send a "
                                  "shape it was built for, or rebuild with --batch / --shapes covering it")
            if self._dynamic() and c.active != prof.index:
                self._switch_profile(c.ctx, prof.index, c.stream)
                c.active = prof.index
            inp = c.buffers[self._input][:math.prod(shape)].view(shape)
            if self._nhwc:  # our engines: the uint8 frames go straight into the input buffer
                inp.copy_(host, non_blocking=True)
            else:  # raw-head / ultralytics engines want float NCHW in 0..1
                inp.copy_(host.to(self._device, non_blocking=True).permute(0, 3, 1, 2).to(self._in_dtype).div_(255))
            if self._dynamic() and not c.ctx.set_input_shape(self._input, shape):
                raise EngineError(f"TensorRT refused input shape {shape}: rebuild with a profile covering it")
            out_shape = tuple(c.ctx.get_tensor_shape(self._output))
            self._execute(c, (prof.index, shape))
            y = c.buffers[self._output][:math.prod(out_shape)].view(out_shape)
            if self._raw:
                dets = [d.cpu().numpy() for d in nms_torch(y, self.info.conf, self.info.iou, self.info.max_det)]
                return dets
            y = y.float().cpu().numpy()  # waits for this stream
        threshold = 0.0 if self._nhwc else self.info.conf
        return [d[d[:, 4] > threshold] for d in y]

    def _switch_profile(self, ctx: Any, index: int, stream: Any) -> None:
        try:
            ok = ctx.set_optimization_profile_async(index, stream.cuda_stream)
        except RuntimeError as e:  # the Python binding raises where the C++ API returns false
            raise EngineError(f"{self.path}: TensorRT refused optimisation profile {index} ({e})") from None
        if ok is False:
            raise EngineError(f"{self.path}: TensorRT refused optimisation profile {index}")

    def _execute(self, c: _Context, key: tuple) -> None:
        import torch

        graph = c.graphs.get(key)
        last, c.last_key = c.last_key, key
        if graph is not None and last == key:  # a graph fixes its shapes: replay it only on an unchanged context
            graph.replay()
            return
        # a plain run after a profile or shape change lets TensorRT recompute what that change needs; the
        # graph captured for this shape becomes replayable again from the next call
        mark = len(self._logger.errors)
        if not c.ctx.execute_async_v3(c.stream.cuda_stream):
            reason = " ".join(self._logger.errors[mark:][-2:]) or "no reason given"
            raise EngineError(f"TensorRT failed to run ({reason})")
        if self._graphs and c.graphs_ok and graph is None:  # ran this shape once: capture it for the next calls
            g = torch.cuda.CUDAGraph()
            try:  # one capture at a time: torch.cuda.graph() empties the allocator cache, fatal to another capture
                with self._capture_lock, torch.cuda.graph(g, stream=c.stream, capture_error_mode="thread_local"):
                    ok = c.ctx.execute_async_v3(c.stream.cuda_stream)
            except RuntimeError:
                ok = False
            if ok:
                c.graphs[key] = g
            else:
                c.graphs_ok = False  # this engine cannot be captured; keep launching it directly

    def close(self) -> None:
        """Release the contexts, graphs and buffers (the engine goes with the last reference)."""
        for c in self._pool.close():
            c.graphs.clear()
            c.buffers.clear()
