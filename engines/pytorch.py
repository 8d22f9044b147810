"""PyTorch backend for `.pt` checkpoints: the GPU path where TensorRT is not installed, and a CPU fallback.

This is the one place `engines` reaches into `trainer` (trainer.checkpoint to rebuild the model,
trainer.postprocess for NMS), imported lazily so the ONNX serving path never imports torch.
CUDA: fp16, channels_last, BatchNorm fused, and one CUDA graph per (batch bucket, H, W) per
instance: a batch is padded up to the next bucket (1, 2, 4, 8, ...), replayed, and the padding
dropped. The input shapes are a finite set on CUDA (EngineInfo.plan_shapes: the shapes of common camera
aspects within imgsz, engines.letterbox.aspect_shapes; the server plans every camera within them), and
`prepare` captures every (bucket, shape) at load: a capture synchronises the device and empties the
allocator's cache, a stall of every instance, so once prepared a shape not captured runs eagerly instead of
being captured while serving (an engine never prepared, e.g. used directly, captures each shape at its
first use, as before). Frames go up through a pinned staging buffer per instance (a copy from pageable
memory is synchronous). CPU: fp32, eager, channels_last (7-17% faster than NCHW with oneDNN's convolutions on
the CI machine; the NHWC uint8 input is already laid out that way). Each instance has its own copy
of the module (weights shared) so concurrent calls never share the head's anchor cache.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .base import Engine, EngineError, EngineInfo, import_torch
from .letterbox import aspect_shapes
from .pool import InstancePool

__all__ = ["TorchEngine", "batch_buckets", "checkpoint_info"]

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a CUDA graph: powers of two below `max_batch`, then `max_batch` itself."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return [*out, max_batch]


def _load(path: str | Path) -> Any:
    import_torch("a .pt engine")
    from trainer.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(path)
    except CheckpointError as e:
        raise EngineError(f"{e} (a .pt engine is a checkpoint written by yolov12-train, or an official / "
                          "ultralytics YOLOv12 .pt)") from None


def _info(ckpt: Any, precision: str, max_batch: int, conf: float, iou: float, max_det: int,
          graphs: bool = False) -> EngineInfo:
    """The engine's metadata; with `graphs` (CUDA graphs) the input shapes are the finite set it captures."""
    from trainer import __version__

    model = ckpt.model
    stride = int(max(model.stride))
    imgsz = (ckpt.imgsz, ckpt.imgsz)
    extra = {"layout": "pytorch", "source": ckpt.source}
    if graphs:  # planned within, captured at load (others run eagerly)
        extra["graph_shapes"] = [list(hw) for hw in aspect_shapes(imgsz, stride)]
    return EngineInfo(names={int(k): str(v) for k, v in model.names.items()}, imgsz=imgsz,
                      stride=stride, batch=(1, max_batch), dynamic_hw=True, precision=precision,
                      variant=model.spec.variant, scale=model.spec.scale, conf=conf, iou=iou, max_det=max_det,
                      version=__version__, extra=extra)


def checkpoint_info(path: str | Path, max_batch: int = 32, conf: float = 0.25, iou: float = 0.7,
                    max_det: int = 300) -> EngineInfo:
    """EngineInfo of a checkpoint as the PyTorch backend would serve it on the CPU (fp32)."""
    return _info(_load(path), "fp32", max_batch, conf, iou, max_det)


def _shared_copy(model: Any) -> Any:
    """A copy of `model` whose parameters and buffers are the original's (only plain attributes are new)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


@dataclass
class _Slot:
    """One instance: its module copy and, on CUDA, its stream and captured graphs."""

    model: Any
    stream: Any = None
    pool: Any = None  # CUDA graph memory pool shared by this slot's graphs (they never run at once)
    graphs: dict[tuple[int, int, int], tuple[Any, ...]] = field(default_factory=dict)
    staging: Any = None  # pinned host buffer the frames go up from (max batch x imgsz, uint8)


class TorchEngine(Engine):
    """A checkpoint served by PyTorch: fp16 + CUDA graphs on a GPU, fp32 on the CPU."""

    def __init__(self, path: str | Path, device: str = "cpu", instances: int = 1, max_batch: int = 32,
                 conf: float = 0.25, iou: float = 0.7, max_det: int = 300, cuda_graphs: bool = True,
                 info: EngineInfo | None = None) -> None:
        torch = import_torch("a .pt engine")
        from trainer.postprocess import non_max_suppression

        if instances < 1 or max_batch < 1:
            raise EngineError(f"instances and max_batch must be >= 1, got {instances} and {max_batch}")
        try:
            self._device = torch.device(device)
        except RuntimeError:
            raise EngineError(f"unknown device '{device}': use 'cpu' or 'cuda:N'") from None
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise EngineError(f"device {device} asked for but torch sees no CUDA GPU: run on the CPU "
                              "(yolov12-serve --gpus cpu; yolov12-predict --device cpu; device='cpu' from Python)")
        self.path, self.device, self.instances = Path(path), str(self._device), instances
        ckpt = _load(path)
        self._cuda = self._device.type == "cuda"
        model = ckpt.model.float().eval().fuse()
        for p in model.parameters():
            p.requires_grad_(False)
        model = (model.half().to(self._device) if self._cuda else model).to(memory_format=torch.channels_last)
        self._graphs = cuda_graphs and self._cuda
        self.info = _info(ckpt, "fp16" if self._cuda else "fp32", max_batch, conf, iou, max_det, self._graphs)
        self._nms = non_max_suppression
        self._capture_lock = threading.Lock()
        self._buckets = batch_buckets(max_batch)
        self._prepared = False  # once prepare() captured the planned shapes, no capture happens while serving
        self._eager_shapes: set[tuple[int, int, int]] = set()  # shapes run eagerly since (logged once each)
        slots = [_Slot(model if k == 0 else _shared_copy(model)) for k in range(instances)]
        if self._cuda:
            h, w = self.info.imgsz
            for s in slots:
                s.stream = torch.cuda.Stream(self._device)
                s.pool = torch.cuda.graph_pool_handle()
                s.staging = torch.empty((max_batch, h, w, 3), dtype=torch.uint8, pin_memory=True)
        self._pool = InstancePool(slots)

    def prepare(self, shapes: list[tuple[int, int]], max_batch: int) -> None:
        """Capture a CUDA graph on every instance for every (batch bucket up to `max_batch`, shape): at load, not
        while serving. A no-op on the CPU or without CUDA graphs."""
        if not self._graphs:
            return
        top = next((k for k in self._buckets if k >= max_batch), self._buckets[-1])
        buckets = [k for k in self._buckets if k <= top]
        for slot in self._pool.items:
            for h, w in shapes:
                for bucket in buckets:
                    if (bucket, h, w) not in slot.graphs:
                        with self._capture_lock:
                            slot.graphs[(bucket, h, w)] = self._capture(slot, bucket, h, w)
        self._prepared = True

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        """uint8 [B, H, W, 3] RGB -> B float32 arrays [n, 6] (x1, y1, x2, y2, score, class) in input pixels."""
        import torch

        self.check_batch(batch)
        with self._pool.borrow() as slot, torch.inference_mode():
            if not self._cuda:
                pred = slot.model(torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float() / 255)
                dets = self._nms(pred, self.info.conf, self.info.iou, self.info.max_det)
                return [d.numpy() for d in dets]
            with torch.cuda.stream(slot.stream):
                if batch.size > slot.staging.numel():  # larger than the checkpoint's size (predict's imgsz): grow
                    slot.staging = torch.empty(batch.size, dtype=torch.uint8, pin_memory=True)
                host = slot.staging.view(-1)[:batch.size].view(batch.shape)
                host.numpy()[...] = batch  # pinned: the copy up is asynchronous (this slot's last one has ended)
                x = host.to(self._device, non_blocking=True)
                pred = self._run_cuda(slot, x)
                dets = self._nms(pred, self.info.conf, self.info.iou, self.info.max_det)
                out = [d.cpu().numpy() for d in dets]  # .cpu() waits for this stream's work
        return out

    # ---- CUDA
    def _forward(self, model: Any, x: Any) -> Any:
        import torch

        return model(x.permute(0, 3, 1, 2).half().div_(255).contiguous(memory_format=torch.channels_last))

    def _run_cuda(self, slot: _Slot, x: Any) -> Any:
        b, h, w = x.shape[:3]
        if not self._graphs:
            return self._forward(slot.model, x)
        bucket = next(k for k in self._buckets if k >= b)
        key = (bucket, h, w)
        if key not in slot.graphs and self._prepared:  # not a shape the planner gives: eager, no capture stall
            if key not in self._eager_shapes:
                self._eager_shapes.add(key)
                log.warning("%s: batch %d at %dx%d was not prepared at load: it runs without a CUDA graph",
                            self.path, bucket, h, w)
            return self._forward(slot.model, x)
        if key not in slot.graphs:
            # one capture at a time: torch.cuda.graph() empties the allocator's cache on entry, which a capture
            # underway on another instance's stream would not survive
            with self._capture_lock:
                try:
                    slot.graphs[key] = self._capture(slot, bucket, h, w)
                except RuntimeError as e:  # a forward that cannot be captured: run eagerly from now on
                    log.warning("%s: CUDA graph capture failed (%s); running without CUDA graphs", self.path, e)
                    self._graphs = False
                    return self._forward(slot.model, x)
        graph, static_in, static_out, _ = slot.graphs[key]
        static_in[:b].copy_(x)
        if b < bucket:
            static_in[b:].zero_()
        graph.replay()
        return static_out[:b]

    def _capture(self, slot: _Slot, bucket: int, h: int, w: int) -> tuple[Any, ...]:
        """Warm up on this slot's stream, then capture one forward at (bucket, h, w) into a CUDA graph.

        The warm-up builds the head's anchors for this shape outside the capture (building them reads the
        strides back to the host, which a capturing stream forbids); the graph reads them, so they are
        returned with it, (graph, input, output, anchors), and stay alive as long as the graph does.
        """
        import torch

        static_in = torch.zeros((bucket, h, w, 3), dtype=torch.uint8, device=self._device)
        for _ in range(2):  # cuDNN autotuning, lazy init and this shape's anchors stay out of the graph
            self._forward(slot.model, static_in)
        slot.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=slot.pool, stream=slot.stream, capture_error_mode="thread_local"):
            static_out = self._forward(slot.model, static_in)
        head = slot.model.head
        return graph, static_in, static_out, (head.anchors, head.strides)

    def close(self) -> None:
        """Drop the captured graphs and the module copies."""
        for slot in self._pool.close():
            slot.graphs.clear()
