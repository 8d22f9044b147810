"""DetectionModel: the layer graph from the yaml, run in order, with optional gradient checkpointing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .head import Detect

__all__ = ["Concat", "DetectionModel", "ModelSpec"]


class Concat(nn.Module):
    """Concatenate a list of maps along `dimension` (channels)."""

    def __init__(self, dimension: int = 1) -> None:
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)


@dataclass
class ModelSpec:
    """What identifies a built model: enough to rebuild it (stored in every checkpoint and engine)."""

    variant: str  # "turbo" | "v1"
    scale: str  # "n" | "s" | "m" | "l" | "x" | "" for a custom yaml
    nc: int
    names: dict[int, str]
    yaml: dict = field(default_factory=dict)  # the layer list as built (ultralytics yaml layout)

    def to_dict(self) -> dict:
        return {"variant": self.variant, "scale": self.scale, "nc": self.nc,
                "names": {int(k): str(v) for k, v in self.names.items()}, "yaml": self.yaml}


@contextlib.contextmanager
def _frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """During a checkpoint's recompute, keep BatchNorm running stats from being updated a second time."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


class DetectionModel(nn.Module):
    """A YOLOv12 detector: `model` is the ordered layer list; each layer carries `.i` and `.f` (its inputs).

    Eval-mode forward on float [B,3,H,W] in 0..1 returns [B, 4+nc, N] (H, W multiples of 32).
    """

    checkpointable = ("C3k2", "A2C2f")

    def __init__(self, layers: list[nn.Module], save: set[int], spec: ModelSpec) -> None:
        super().__init__()
        self.model = nn.Sequential(*layers)
        self.save = sorted(save)
        self.spec = spec
        self.grad_checkpointing = False
        head = self.head
        head.stride = self._probe_strides()
        head.bias_init()

    # ---- what the rest of the project reads
    @property
    def head(self) -> Detect:
        return self.model[-1]

    @property
    def names(self) -> dict[int, str]:
        return self.spec.names

    @property
    def nc(self) -> int:
        return self.spec.nc

    @property
    def stride(self) -> torch.Tensor:
        return self.head.stride

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute backbone and neck blocks in backward instead of keeping their activations."""
        self.grad_checkpointing = enable

    # ---- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        outputs: list[torch.Tensor | None] = []
        for m in self.model:
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j] for j in m.f]
            x = self._run_layer(m, x)
            outputs.append(x if m.i in self.save else None)
        return x

    def _run_layer(self, m: nn.Module, x):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled() and m.type in self.checkpointable:
            return checkpoint(m, x, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(), _frozen_bn_stats(m)))
        return m(x)

    def _probe_strides(self) -> torch.Tensor:
        """Strides of the head's inputs, from one small forward pass in training mode."""
        was_training = self.training
        self.train()
        with torch.no_grad():
            maps = self.forward(torch.zeros(1, 3, 256, 256))
        self.train(was_training)
        self._reset_bn_stats()
        return torch.tensor([256 / m.shape[-2] for m in maps])

    def _reset_bn_stats(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()

    # ---- inference helpers
    def fuse(self) -> DetectionModel:
        """Fold every BatchNorm into its convolution (inference only); returns self."""
        for m in self.modules():
            if hasattr(m, "fuse") and m is not self:
                m.fuse()
        return self

    def info(self, imgsz: int = 640) -> dict:
        """Layers, parameters, gradients and GFLOPs at `imgsz` (counted with torch.utils.flop_counter)."""
        from torch.utils.flop_counter import FlopCounterMode

        params = sum(p.numel() for p in self.parameters())
        grads = sum(p.numel() for p in self.parameters() if p.requires_grad)
        was_training = self.training
        self.eval()
        p = next(self.parameters())
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            self.forward(torch.zeros(1, 3, imgsz, imgsz, dtype=p.dtype, device=p.device))
        self.train(was_training)
        layers = sum(1 for _ in self.modules())
        return {"layers": layers, "parameters": params, "gradients": grads,
                "gflops": counter.get_total_flops() / 1e9, "imgsz": imgsz,
                "variant": self.spec.variant, "scale": self.spec.scale, "nc": self.nc}
