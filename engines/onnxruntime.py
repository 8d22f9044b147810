"""ONNX Runtime backend: the CPU default (no torch), with CUDA / TensorRT execution providers when installed.

K sessions (instances) share the cores: each gets `threads` intra-op threads (default cores // K),
and a pool lends one session per call, so up to K callers run at once. On the CPU, single frames of a
shape that keeps coming get sessions with that shape fixed (ort_fixed.py: 4-5% faster at 192x320).
Our end-to-end graphs take the uint8 NHWC batch as is and return [B, max_det, 6]; raw-head graphs
(`--raw`, ultralytics exports) get the float NCHW conversion and NMS on the host (numpy).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .base import Engine, EngineError, EngineInfo
from .metadata import check_graph, read_info
from .nms import nms_numpy
from .ort_fixed import FixedShapeSessions
from .pool import InstancePool

__all__ = ["OnnxRuntimeEngine", "available_cores"]


def available_cores() -> int:
    """CPU cores this process may run on (cgroup/affinity aware where the OS says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _cuda_index(device: str) -> int | None:
    """None for 'cpu'; N for 'cuda', 'cuda:N' or 'N'."""
    d = str(device).strip().lower()
    if d in ("cpu", ""):
        return None
    if d == "cuda":
        return 0
    d = d.removeprefix("cuda:")
    if d.isdigit():
        return int(d)
    raise EngineError(f"unknown device '{device}': use 'cpu' or 'cuda:N'")


def _providers(device: str, model_path: Path) -> list[Any]:
    import onnxruntime as ort

    index = _cuda_index(device)
    if index is None:
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    providers: list[Any] = []
    if "TensorrtExecutionProvider" in available:  # builds its own engine on first run; cached beside the model
        cache = model_path.with_name(model_path.name + ".ort-trt-cache")
        providers.append(("TensorrtExecutionProvider", {"device_id": index, "trt_engine_cache_enable": True,
                                                        "trt_engine_cache_path": str(cache)}))
    if "CUDAExecutionProvider" in available:
        providers.append(("CUDAExecutionProvider", {"device_id": index}))
    if not providers:
        raise EngineError(f"device {device} asked for, but this onnxruntime has no CUDA provider "
                          f"(it has {', '.join(available)}): `pip install onnxruntime-gpu`, or run on the CPU "
                          "(yolov12-serve --gpus cpu; yolov12-predict --device cpu; device='cpu' from Python)")
    return [*providers, "CPUExecutionProvider"]


class OnnxRuntimeEngine(Engine):
    """An `.onnx` file run by ONNX Runtime with `instances` sessions of `threads` intra-op threads each."""

    def __init__(self, path: str | Path, device: str = "cpu", instances: int = 1, threads: int | None = None,
                 spinning: bool | None = None, info: EngineInfo | None = None, fixed_after: int = 50) -> None:
        """`fixed_after`: single-frame calls of one shape before fixed-shape sessions are built for it (CPU;
        0: never)."""
        self.path = Path(path)
        self.info = info or read_info(self.path)
        self.device = "cpu" if _cuda_index(device) is None else f"cuda:{_cuda_index(device)}"
        if instances < 1:
            raise EngineError(f"instances must be >= 1, got {instances}")
        self.instances = instances
        self.threads = threads or max(1, available_cores() // instances)
        self._spinning = spinning
        providers = _providers(self.device, self.path)
        try:
            sessions = [self._session(providers) for _ in range(instances)]
        except Exception as e:  # InvalidProtobuf, InvalidGraph, Fail: all surface as the base pybind error
            raise EngineError(f"{self.path}: ONNX Runtime cannot load it ({type(e).__name__}: {str(e)[:300]}): "
                              "export it again with yolov12-export") from None
        self._sessions = sessions
        self._pool = InstancePool(list(range(instances)))
        first = sessions[0]
        inp, out = first.get_inputs()[0], first.get_outputs()[0]
        symbolic = {i: d for i, d in enumerate(inp.shape) if isinstance(d, str)}
        self._fixed = (FixedShapeSessions(lambda shape: self._session(providers, symbolic, shape), instances,
                                          fixed_after, idle_priority=self.threads == 1)
                       if fixed_after > 0 and symbolic and providers == ["CPUExecutionProvider"] else None)
        self._input, self._output = inp.name, out.name
        self._input_dtype = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32,
                             "tensor(float16)": np.float16}.get(inp.type)
        if self._input_dtype is None:
            raise EngineError(f"{self.path}: input '{inp.name}' is {inp.type}; expected uint8 NHWC (yolov12-export) "
                              "or float NCHW (a raw-head export)")
        check_graph(self.info, str(self.path), inp.shape, out.shape, nhwc=self._input_dtype == np.uint8)
        self._raw = self.info.extra.get("layout", "end2end") == "raw"
        self.providers = first.get_providers()

    def _session(self, providers: list[Any], symbolic: dict[int, str] | None = None,
                 shape: tuple[int, ...] | None = None) -> Any:
        """A session with our thread settings; with `shape`, every symbolic input dimension fixed to it."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if self._spinning is not None:  # busy-waiting threads: fastest alone, wasteful beside other sessions
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self._spinning else "0")
        for axis, name in (symbolic or {}).items():
            opts.add_free_dimension_override_by_name(name, int(shape[axis]))
        session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        if shape is not None and tuple(session.get_inputs()[0].shape) != tuple(shape):  # e.g. H and W share a name
            raise EngineError(f"fixing {symbolic} to {shape} gave input {session.get_inputs()[0].shape}")
        return session

    @property
    def fixed_shapes(self) -> list[tuple[int, ...]]:
        """Feed shapes that run on fixed-shape sessions by now (see ort_fixed.py)."""
        return self._fixed.shapes if self._fixed is not None else []

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        """uint8 [B, H, W, 3] RGB -> B float32 arrays [n, 6] (x1, y1, x2, y2, score, class) in input pixels."""
        self.check_batch(batch)
        if self._input_dtype == np.uint8:
            feed = np.ascontiguousarray(batch)
        else:  # raw-head and ultralytics graphs want float NCHW in 0..1
            feed = np.ascontiguousarray(batch.transpose(0, 3, 1, 2)).astype(self._input_dtype) / 255
        with self._pool.borrow() as i:
            session = self._fixed.get(i, feed.shape) if self._fixed is not None else None
            if session is None:
                session = self._sessions[i]
                if session is None:  # closed after this call borrowed its instance
                    raise EngineError("the engine was closed: load it again")
                if self._fixed is not None:
                    self._fixed.saw(feed.shape)
            y = session.run([self._output], {self._input: feed})[0]
        if self._raw:
            return nms_numpy(y, self.info.conf, self.info.iou, self.info.max_det)
        y = y.astype(np.float32, copy=False)
        return [d[d[:, 4] > (0 if self._input_dtype == np.uint8 else self.info.conf)] for d in y]

    def close(self) -> None:
        """Drop the sessions (their memory is freed when no call still holds one), whether or not the engine object
        itself is ever collected (the server freezes its start-up objects out of garbage collection)."""
        self._pool.close()
        self._sessions = [None] * len(self._sessions)
        if self._fixed is not None:
            self._fixed.close()
