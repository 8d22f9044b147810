"""Task-aligned label assignment (TOOD, arXiv:2108.07755), as YOLOv8-v12 train with it.

Each ground-truth box takes as positives the `topk` anchors whose centres lie inside it and that
score best on the alignment metric `score(class)^alpha * CIoU^beta`; an anchor claimed by several
boxes keeps the one it overlaps most. Target scores are the one-hot class scaled, per box, so that
its best-aligned anchor gets that anchor's IoU (quality-aware soft targets).

Memory: the largest tensors are [B, max_boxes, anchors] (no per-class dimension on top); the
metrics are computed only for (box, anchor) pairs whose centre lies inside the box.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.ops import complete_box_iou_loss

from .boxes import xywh2xyxy, xyxy2xywh

__all__ = ["Assignment", "TaskAlignedAssigner"]


@dataclass
class Assignment:
    """Per-anchor targets: labels [B,N] long, boxes [B,N,4] xyxy, scores [B,N,nc], fg_mask [B,N], gt_idx [B,N]."""

    labels: torch.Tensor
    bboxes: torch.Tensor
    scores: torch.Tensor
    fg_mask: torch.Tensor
    gt_idx: torch.Tensor


class TaskAlignedAssigner(nn.Module):
    """Assign ground-truth boxes to anchors by the task-aligned metric (no gradients).

    `min_gt_side`: box sides shorter than this (pixels) are widened to it about their centre when
    choosing candidate anchors only, so thin or tiny objects (a hairline scratch) still contain an
    anchor centre. ultralytics >= 8.3 does this with the middle stride (16); 0 turns it off.
    """

    def __init__(self, topk: int = 10, num_classes: int = 80, alpha: float = 0.5, beta: float = 6.0,
                 eps: float = 1e-9, min_gt_side: float = 0.0) -> None:
        super().__init__()
        self.topk, self.num_classes = topk, num_classes
        self.alpha, self.beta, self.eps = alpha, beta, eps
        self.min_gt_side = min_gt_side

    @torch.no_grad()
    def forward(self, pd_scores: torch.Tensor, pd_bboxes: torch.Tensor, anc_points: torch.Tensor,
                gt_labels: torch.Tensor, gt_bboxes: torch.Tensor, mask_gt: torch.Tensor) -> Assignment:
        """Assign targets from predictions (scores [B,N,nc] sigmoid, xyxy boxes [B,N,4] px), anchor centres [N,2] px
        and padded ground truth (labels [B,M,1], xyxy boxes [B,M,4] px, valid [B,M,1])."""
        b, n, _ = pd_scores.shape
        m = gt_bboxes.shape[1]
        if m == 0:
            return Assignment(labels=torch.full((b, n), self.num_classes, dtype=torch.long, device=pd_scores.device),
                              bboxes=torch.zeros_like(pd_bboxes), scores=torch.zeros_like(pd_scores),
                              fg_mask=torch.zeros((b, n), dtype=torch.bool, device=pd_scores.device),
                              gt_idx=torch.zeros((b, n), dtype=torch.long, device=pd_scores.device))
        valid = mask_gt.bool()  # [B, M, 1]
        in_gts = self.candidates_in_gts(anc_points, gt_bboxes, valid)  # [B, M, N]
        align, overlaps = self.alignment(pd_scores, pd_bboxes, gt_labels, gt_bboxes, in_gts & valid)
        mask_pos = self.topk_mask(align, valid) & in_gts & valid  # [B, M, N]
        gt_idx, fg_mask, mask_pos = self.resolve_conflicts(mask_pos, overlaps)

        batch_offset = torch.arange(b, device=gt_labels.device).unsqueeze(1) * m
        flat_idx = gt_idx + batch_offset  # [B, N] into the flattened [B*M] boxes
        labels = gt_labels.long().flatten()[flat_idx].clamp_(0)
        bboxes = gt_bboxes.reshape(-1, 4)[flat_idx]
        scores = torch.zeros((b, n, self.num_classes), dtype=pd_scores.dtype, device=pd_scores.device)
        scores.scatter_(2, labels.unsqueeze(-1), 1.0)
        scores *= fg_mask.unsqueeze(-1)

        # Soft targets: per box, scale alignment so its best anchor gets that box's best IoU.
        align = align * mask_pos
        overlaps = overlaps * mask_pos
        best_align = align.amax(-1, keepdim=True)  # [B, M, 1]
        best_iou = overlaps.amax(-1, keepdim=True)
        norm = (align * best_iou / (best_align + self.eps)).amax(-2)  # [B, N]
        return Assignment(labels=labels, bboxes=bboxes, scores=scores * norm.unsqueeze(-1),
                          fg_mask=fg_mask, gt_idx=gt_idx)

    def candidates_in_gts(self, anc_points: torch.Tensor, gt_bboxes: torch.Tensor,
                          valid: torch.Tensor) -> torch.Tensor:
        """[B, M, N]: anchor centre strictly inside the (minimum-side-widened) box."""
        if self.min_gt_side > 0:
            xywh = xyxy2xywh(gt_bboxes)
            small = (xywh[..., 2:] < self.min_gt_side) & valid
            xywh[..., 2:] = torch.where(small, torch.full_like(xywh[..., 2:], self.min_gt_side), xywh[..., 2:])
            gt_bboxes = xywh2xyxy(xywh)
        x1, y1, x2, y2 = gt_bboxes.unsqueeze(-1).unbind(-2)  # [B, M, 1] each
        ax, ay = anc_points[:, 0], anc_points[:, 1]  # [N]
        inside = (ax - x1) > self.eps  # [B, M, N] booleans, one side at a time
        inside &= (ay - y1) > self.eps
        inside &= (x2 - ax) > self.eps
        inside &= (y2 - ay) > self.eps
        return inside

    def alignment(self, pd_scores: torch.Tensor, pd_bboxes: torch.Tensor, gt_labels: torch.Tensor,
                  gt_bboxes: torch.Tensor, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Alignment metric and CIoU (clamped at 0) of candidate (box, anchor) pairs, 0 elsewhere: [B, M, N] each."""
        bi, gi, ai = pairs.nonzero(as_tuple=True)
        cls_score = pd_scores[bi, ai, gt_labels[bi, gi, 0].long()]
        ciou = (1.0 - complete_box_iou_loss(gt_bboxes[bi, gi], pd_bboxes[bi, ai], eps=1e-7)).clamp_(0)
        overlaps = torch.zeros(pairs.shape, dtype=pd_bboxes.dtype, device=pd_bboxes.device)
        align = torch.zeros(pairs.shape, dtype=pd_scores.dtype, device=pd_scores.device)
        overlaps[bi, gi, ai] = ciou.to(overlaps.dtype)
        align[bi, gi, ai] = cls_score.pow(self.alpha) * ciou.pow(self.beta)
        return align, overlaps

    def topk_mask(self, align: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[B, M, N] bool: the `topk` anchors by alignment for each valid box."""
        idx = torch.topk(align, self.topk, dim=-1, largest=True).indices  # [B, M, k]
        idx = idx.masked_fill(~valid, 0)  # padded boxes all point at anchor 0 ...
        count = torch.zeros(align.shape, dtype=torch.int8, device=align.device)
        count.scatter_add_(-1, idx, torch.ones_like(idx, dtype=torch.int8))
        return count == 1  # ... and are dropped here (their count is k > 1)

    @staticmethod
    def resolve_conflicts(mask_pos: torch.Tensor,
                          overlaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """An anchor positive for several boxes keeps the one it overlaps most -> (gt_idx [B,N], fg, mask [B,M,N])."""
        multi = (mask_pos.sum(-2, keepdim=True) > 1).expand_as(mask_pos)
        best = torch.zeros_like(mask_pos).scatter_(1, overlaps.max(1, keepdim=True).indices, True)
        mask_pos = torch.where(multi, best, mask_pos)
        fg_mask, gt_idx = mask_pos.to(torch.uint8).max(-2)
        return gt_idx, fg_mask.bool(), mask_pos
