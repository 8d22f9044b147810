"""The anchor-free detection head: per level a box branch (DFL over 16 bins) and a class branch."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..boxes import dist2bbox, make_anchors
from .conv import Conv, DWConv

__all__ = ["DFL", "Detect"]


class DFL(nn.Module):
    """Distribution focal loss integral: softmax over `c1` bins, expectation with fixed weights 0..c1-1."""

    def __init__(self, c1: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape  # [B, 4*c1, A]
        # bins on the last axis: ONNX Runtime runs a Softmax over any other axis through transposes, 0.9 ms of a
        # 23 ms yolov12n run at 192x320 on one CPU core (ultralytics' softmax(1) export pays it); 0.1 ms this way
        bins = x.view(b, 4, self.c1, a).transpose(2, 3).softmax(-1)  # [B, 4, A, c1]
        return (bins * self.conv.weight.view(self.c1)).sum(-1)  # sum_i p_i * i (as a MatMul ORT took 1.5 ms)


class Detect(nn.Module):
    """YOLO detection head over the P3/P4/P5 maps.

    Training: a list of raw maps [B, 4*reg_max + nc, H, W] per level (the loss decodes them).
    Eval: [B, 4 + nc, N] with xywh in input pixels, then sigmoid class scores (no objectness).
    """

    def __init__(self, nc: int = 80, ch: tuple[int, ...] = (), reg_max: int = 16) -> None:
        super().__init__()
        self.nc, self.nl, self.reg_max = nc, len(ch), reg_max
        self.no = nc + reg_max * 4
        self.register_buffer("stride", torch.zeros(self.nl), persistent=False)
        c2, c3 = max(16, ch[0] // 4, reg_max * 4), max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1))
                                 for x in ch)
        self.cv3 = nn.ModuleList(
            nn.Sequential(
                nn.Sequential(DWConv(x, x, 3), Conv(x, c3, 1)),
                nn.Sequential(DWConv(c3, c3, 3), Conv(c3, c3, 1)),
                nn.Conv2d(c3, nc, 1),
            )
            for x in ch
        )
        self.dfl = DFL(reg_max)
        self._anchor_key: tuple | None = None

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor] | torch.Tensor:
        maps = [torch.cat((self.cv2[i](x), self.cv3[i](x)), 1) for i, x in enumerate(xs)]
        return maps if self.training else self.decode(maps)

    def decode(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Raw per-level maps -> [B, 4 + nc, N]: DFL distances to xywh pixels, sigmoid scores."""
        b = maps[0].shape[0]
        key = tuple(m.shape[-2:] for m in maps) + (maps[0].dtype, maps[0].device)
        if key != self._anchor_key or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            anchors, strides = make_anchors(maps, self.stride)
            self.anchors, self.strides = anchors.transpose(0, 1), strides.transpose(0, 1)
            self._anchor_key = key
        flat = torch.cat([m.view(b, self.no, -1) for m in maps], 2)
        box, cls = flat.split((self.reg_max * 4, self.nc), 1)
        xywh = dist2bbox(self.dfl(box), self.anchors.unsqueeze(0), xywh=True, dim=1) * self.strides
        return torch.cat((xywh, cls.sigmoid()), 1)

    def bias_init(self) -> None:
        """Box bias 1.0; class bias log(5 / nc / (640 / stride)^2): about 5 objects per 640 image at start."""
        for a, b, s in zip(self.cv2, self.cv3, self.stride):
            a[-1].bias.data[:] = 1.0
            b[-1].bias.data[: self.nc] = math.log(5 / self.nc / (640 / float(s)) ** 2)
