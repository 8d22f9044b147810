"""Optimizer and learning-rate schedule of the YOLOv12 recipe.

Three parameter groups: weights with decay, norm weights and biases without. Below the nominal
batch (nbs) the trainer accumulates batches up to nbs images a step; weight decay is scaled by the
images a step holds over nbs, and the loss by them, as in ultralytics.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

__all__ = ["build_optimizer", "lr_lambda", "warmup"]


def _param_groups(model: nn.Module) -> tuple[list, list, list]:
    decay, norm_weights, biases = [], [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if name == "bias":
                biases.append(p)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm | nn.GroupNorm | nn.LayerNorm):
                norm_weights.append(p)
            else:
                decay.append(p)
    return decay, norm_weights, biases


def build_optimizer(model: nn.Module, name: str, lr0: float, momentum: float, weight_decay: float,
                    iterations: int, nc: int) -> tuple[torch.optim.Optimizer, str, float]:
    """SGD (Nesterov) or AdamW over the three groups. `auto` picks as the reference does:
    SGD lr0=0.01 for long runs (> 10k iterations), else AdamW with lr fitted to the class count.
    Returns (optimizer, chosen name, lr0).
    """
    if name == "auto":
        name, lr0, momentum = ("SGD", 0.01, 0.9) if iterations > 10_000 else ("AdamW", round(0.002 * 5 / (4 + nc), 6),
                                                                              0.9)
    decay, norm_weights, biases = _param_groups(model)
    if name == "AdamW":
        opt = torch.optim.AdamW(biases, lr=lr0, betas=(momentum, 0.999), weight_decay=0.0)
    elif name == "SGD":
        opt = torch.optim.SGD(biases, lr=lr0, momentum=momentum, nesterov=True)
    else:
        raise ValueError(f"optimizer '{name}' not supported: use auto, SGD or AdamW")
    opt.add_param_group({"params": decay, "weight_decay": weight_decay})
    opt.add_param_group({"params": norm_weights, "weight_decay": 0.0})
    for g in opt.param_groups:
        g["initial_lr"] = lr0
    return opt, name, lr0


def lr_lambda(epochs: int, lrf: float, cosine: bool) -> Callable[[float], float]:
    """Epoch -> LR factor: linear from 1 to lrf, or a cosine with the same ends."""
    if cosine:
        return lambda e: ((1 - math.cos(e * math.pi / epochs)) / 2) * (lrf - 1) + 1
    return lambda e: max(1 - e / epochs, 0) * (1.0 - lrf) + lrf


def warmup(opt: torch.optim.Optimizer, it: int, warmup_iters: int, epoch_factor: float, warmup_bias_lr: float,
           warmup_momentum: float, momentum: float) -> None:
    """Linear warmup over the first iterations: biases from warmup_bias_lr down, others from 0 up, momentum up."""
    xp = [0, warmup_iters]
    for i, g in enumerate(opt.param_groups):
        start = warmup_bias_lr if i == 0 else 0.0  # group 0 holds the biases
        g["lr"] = float(np.interp(it, xp, [start, g["initial_lr"] * epoch_factor]))
        if "momentum" in g:
            g["momentum"] = float(np.interp(it, xp, [warmup_momentum, momentum]))
        elif "betas" in g:
            g["betas"] = (float(np.interp(it, xp, [warmup_momentum, momentum])), g["betas"][1])
