"""Box maths shared by the detection head, the loss, validation and export (torch).

Pairwise IoU, CIoU and NMS come from torchvision.ops; this module holds only what
torchvision lacks: anchor grids and the distance <-> box conversions of the DFL head.
"""

from __future__ import annotations

import torch
from torchvision.ops import box_convert

__all__ = ["bbox2dist", "dist2bbox", "make_anchors", "xywh2xyxy", "xyxy2xywh"]


def xywh2xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """Centre-size boxes -> corner boxes (any leading shape)."""
    return box_convert(boxes, "cxcywh", "xyxy")


def xyxy2xywh(boxes: torch.Tensor) -> torch.Tensor:
    """Corner boxes -> centre-size boxes (any leading shape)."""
    return box_convert(boxes, "xyxy", "cxcywh")


def make_anchors(feats: list[torch.Tensor], strides: torch.Tensor,
                 offset: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor points at cell centres, in grid units, for each level: ([N, 2] xy, [N, 1] stride)."""
    points, stride_col = [], []
    for feat, stride in zip(feats, strides):
        h, w = feat.shape[-2:]
        dtype, device = feat.dtype, feat.device
        sy = torch.arange(h, device=device, dtype=dtype) + offset
        sx = torch.arange(w, device=device, dtype=dtype) + offset
        yy, xx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((xx, yy), -1).view(-1, 2))
        stride_col.append(torch.full((h * w, 1), float(stride), dtype=dtype, device=device))
    return torch.cat(points), torch.cat(stride_col)


def dist2bbox(distance: torch.Tensor, anchors: torch.Tensor, xywh: bool = True, dim: int = -1) -> torch.Tensor:
    """(left, top, right, bottom) distances from anchor points -> boxes (xywh or xyxy)."""
    lt, rb = distance.chunk(2, dim)
    x1y1, x2y2 = anchors - lt, anchors + rb
    if xywh:
        return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), dim)
    return torch.cat((x1y1, x2y2), dim)


def bbox2dist(anchors: torch.Tensor, boxes_xyxy: torch.Tensor, reg_max: float) -> torch.Tensor:
    """Corner boxes -> (l, t, r, b) distances from anchor points, clamped for the DFL bins."""
    x1y1, x2y2 = boxes_xyxy.chunk(2, -1)
    return torch.cat((anchors - x1y1, x2y2 - anchors), -1).clamp_(0, reg_max - 0.01)
