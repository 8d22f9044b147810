"""The runtime contract every backend implements: `Engine.info` (the artifact's metadata) and `Engine.infer`.

An engine takes a uint8 NHWC RGB batch (the host does no float work) and returns, per image,
an [n, 6] float32 array (x1, y1, x2, y2, score, class) in input pixels. `infer` is thread-safe:
up to `instances` calls run at once, each on its own session / execution context.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["PAD_VALUE", "Engine", "EngineError", "EngineInfo", "class_names", "import_torch", "pad_batch", "run_padded"]

PAD_VALUE = 114  # the grey of letterbox borders, also what pads a batch up to an engine's minimum


class EngineError(RuntimeError):
    """A model artifact that cannot be loaded or run; the message says what to do."""


def import_torch(what: str) -> Any:
    """The torch module, or EngineError saying how to get it (one line from yolov12-serve, not a traceback of "No
    module named 'torch'"): the serving install (ONNX Runtime only) has none."""
    try:
        import torch
    except ImportError:
        raise EngineError(f"{what} needs PyTorch, which this environment lacks: pip install torch (the project's "
                          "`train` extra has it), or export ONNX and serve it with ONNX Runtime") from None
    return torch


def class_names(names: Any) -> dict[int, str]:
    """`names` as {0: str, ..., N-1: str} (keys may be digit strings, as JSON writes them); ValueError otherwise, so a
    corrupt list never labels detections with the wrong class."""
    if not isinstance(names, dict):
        raise ValueError(f"'names' must map class ids 0..N-1 to text, got a {type(names).__name__}")
    try:
        out = {int(k): v for k, v in names.items() if not isinstance(k, bool | float)}
    except ValueError:
        out = {}
    if len(out) != len(names) or sorted(out) != list(range(len(out))) or not all(isinstance(v, str)
                                                                                   for v in out.values()):
        raise ValueError(f"'names' must map class ids 0..N-1 to text, got {str(names)[:60]}")
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class EngineInfo:
    """Metadata carried inside every engine file (ONNX metadata_props, TensorRT header, .pt checkpoint)."""

    names: dict[int, str]
    imgsz: tuple[int, int]  # (height, width): the largest input the engine takes
    stride: int = 32
    batch: tuple[int, int] = (1, 1)  # (min, max) batch size
    dynamic_hw: bool = False  # height and width may be any stride multiple up to imgsz
    precision: str = "fp32"  # fp32 | fp16 | int8
    variant: str = ""  # turbo | v1
    scale: str = ""  # n | s | m | l | x
    conf: float = 0.25  # score threshold applied inside the engine
    iou: float = 0.7  # NMS IoU threshold applied inside the engine
    max_det: int = 300
    version: str = ""  # yolov12-serve version that wrote it
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def nc(self) -> int:
        return len(self.names)

    @property
    def shapes(self) -> list[tuple[int, int]] | None:
        """The only input (h, w) the engine takes, when it was built for a list of them (a TensorRT engine built
        with --shapes: an optimisation profile each); None: any stride multiple within imgsz (dynamic_hw) or
        imgsz alone."""
        return self._listed("shapes")

    @property
    def plan_shapes(self) -> list[tuple[int, int]] | None:
        """The input shapes to plan frames within: `shapes`, or those the engine prepared itself for (a PyTorch
        engine's CUDA graphs, `graph_shapes`: others run, but eagerly); None: any."""
        return self.shapes or self._listed("graph_shapes")

    def _listed(self, key: str) -> list[tuple[int, int]] | None:
        listed = self.extra.get(key)
        if not listed or not self.dynamic_hw:
            return None
        return [(int(h), int(w)) for h, w in listed]

    def to_json(self) -> str:
        d = asdict(self)
        d["names"] = {str(k): v for k, v in self.names.items()}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> EngineInfo:
        """EngineInfo from `to_json`'s text; ValueError / TypeError say what is malformed (callers name the file)."""
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["names"] = class_names(d.get("names") or {})
        for key in ("imgsz", "batch"):
            if key in known:
                v = known[key]
                known[key] = (int(v), int(v)) if isinstance(v, int | float) else tuple(int(x) for x in v)
        return cls(**known)


class Engine(ABC):
    """A loaded model artifact on one device."""

    info: EngineInfo
    device: str  # "cpu", "cuda:0", ...
    instances: int = 1

    @abstractmethod
    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        """uint8 [B, H, W, 3] RGB (H, W stride multiples within info.imgsz) -> B arrays [n, 6] in input pixels."""

    def close(self) -> None:  # noqa: B027 - optional for backends holding no external resources
        """Free sessions, contexts and device memory."""

    def check_batch(self, batch: np.ndarray) -> None:
        """Raise EngineError with the fix when `batch` does not fit this engine."""
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise EngineError(f"expected a uint8 [B,H,W,3] batch, got {batch.dtype} {list(batch.shape)}")
        b, h, w = batch.shape[:3]
        lo, hi = self.info.batch
        if not lo <= b <= hi:
            raise EngineError(f"batch of {b} outside the engine's range {lo}..{hi}: re-export with --batch {b} "
                              "--dynamic, or send smaller batches")
        ih, iw = self.info.imgsz
        shapes = self.info.shapes
        if shapes is not None and (h, w) not in shapes:
            built = ", ".join(f"{sh}x{sw}" for sh, sw in shapes)
            raise EngineError(f"input {h}x{w} is not one of the shapes the engine was built for ({built}): rebuild "
                              f"with --shapes listing it (the server plans every camera within the built shapes)")
        if self.info.dynamic_hw:
            s = self.info.stride
            if h % s or w % s or h > ih or w > iw:
                raise EngineError(f"input {h}x{w} must be multiples of {s} within {ih}x{iw}")
        elif (h, w) != (ih, iw):
            raise EngineError(f"input {h}x{w} but the engine was exported for {ih}x{iw} (export with --dynamic)")

    def prepare(self, shapes: list[tuple[int, int]], max_batch: int) -> None:  # noqa: B027 - optional
        """Get ready, before serving, for every input (h, w) in `shapes` at batch sizes up to `max_batch` (the
        PyTorch backend captures its CUDA graphs here: a capture while serving stalls the device); the server
        calls it at load, with the shapes its input planner can produce."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pad_batch(batch: np.ndarray, min_batch: int) -> np.ndarray:
    """`batch` with grey frames appended up to `min_batch` (a static --batch 8 engine takes batches of 8 only);
    itself when it is large enough."""
    n = len(batch)
    if n >= min_batch:
        return batch
    padded = np.empty((min_batch, *batch.shape[1:]), batch.dtype)
    padded[:n] = batch
    padded[n:] = PAD_VALUE
    return padded


def run_padded(engine: Engine, batch: np.ndarray) -> list[np.ndarray]:
    """`engine.infer` on a batch padded up to the engine's minimum batch; the padding's results dropped."""
    return engine.infer(pad_batch(batch, engine.info.batch[0]))[:len(batch)]
