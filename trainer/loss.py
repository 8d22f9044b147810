"""The YOLOv8-v12 detection loss: task-aligned assignment, BCE on classes, CIoU + DFL on boxes.

The mathematics are those of ultralytics' `v8DetectionLoss` (checked against it in
tests/test_loss.py); what differs is the normalisation contract, which is left to the trainer so
that gradient accumulation and DDP give exactly the gradient of one step on the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import complete_box_iou_loss

from .assigner import TaskAlignedAssigner
from .boxes import bbox2dist, dist2bbox, make_anchors, xywh2xyxy

__all__ = ["DetectionLoss", "LossOutput"]


@dataclass
class LossOutput:
    """One (micro-)batch's loss, un-normalised; see `DetectionLoss` for how the trainer combines them.

    total: scalar, differentiable: box_gain * sum(CIoU loss) + cls_gain * sum(BCE) + dfl_gain * sum(DFL).
    norm:  scalar, detached: this batch's target-score sum (the ultralytics normaliser, before its clamp to 1).
    items: [3] detached (box, cls, dfl), gain-weighted, each divided by max(norm, 1): for logging only.
    """

    total: torch.Tensor
    norm: torch.Tensor
    items: torch.Tensor


class DetectionLoss:
    """Detection loss for the train-mode head output (a list of per-level maps [B, 4*reg_max + nc, H, W]).

    Contract (exact gradient accumulation and DDP): the loss is NOT divided by its own target-score
    sum. For a global batch of size B split into micro-batches (and ranks) i, the trainer computes

        loss = sum_i total_i / max(sum_i norm_i, 1) * B

    where the sums run over every micro-batch of every rank (and every batch accumulated into the step;
    B is then all their images), all-reduced once per step, which is
    ultralytics' loss on the whole batch: `(total / max(norm, 1)) * B` equals their `loss.sum()` (their
    loss is a per-batch mean scaled by the batch size). In practice it backpropagates each `total_i`
    as it comes and rescales the summed gradients (summed over ranks, not averaged) by B / max(sum of
    norms, 1) before the optimiser step.
    Maths in float32 whatever the autocast dtype (sums over every anchor and class).
    """

    def __init__(self, model: nn.Module, box: float = 7.5, cls: float = 0.5, dfl: float = 1.5,
                 topk: int = 10) -> None:
        head = model.head if hasattr(model, "head") else model.model[-1]
        self.stride = head.stride.detach().float()
        self.nc, self.reg_max = head.nc, head.reg_max
        self.gains = (box, cls, dfl)
        strides = self.stride.tolist()
        self.assigner = TaskAlignedAssigner(topk=topk, num_classes=self.nc, alpha=0.5, beta=6.0,
                                            min_gt_side=strides[1] if len(strides) > 1 else strides[0])

    def __call__(self, preds: list[torch.Tensor], batch: dict[str, Any]) -> LossOutput:
        """Loss of raw head maps `preds` against `batch` (batch_idx [M], cls [M,1], bboxes [M,4] normalised cxcywh)."""
        b, device = preds[0].shape[0], preds[0].device
        stride = self.stride.to(device)
        flat = torch.cat([p.reshape(b, p.shape[1], -1) for p in preds], 2)  # [B, no, N]
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()  # sums over every anchor and class: never in half precision
        pred_dist, pred_logits = flat.permute(0, 2, 1).split((4 * self.reg_max, self.nc), 2)  # [B,N,64], [B,N,nc]
        anchors, anchor_stride = make_anchors(preds, stride, 0.5)
        anchors, anchor_stride = anchors.to(flat.dtype), anchor_stride.to(flat.dtype)
        imgsz = torch.tensor(preds[0].shape[2:], device=device, dtype=flat.dtype) * stride[0]  # (h, w)

        gt_labels, gt_bboxes, mask_gt = self.targets(batch, b, imgsz, device)
        pred_bboxes = self.decode(anchors, pred_dist)  # xyxy, grid units
        assigned = self.assigner(pred_logits.detach().sigmoid(), pred_bboxes.detach() * anchor_stride,
                                 anchors * anchor_stride, gt_labels, gt_bboxes, mask_gt)
        target_scores, fg = assigned.scores, assigned.fg_mask
        norm = target_scores.sum()

        loss_cls = F.binary_cross_entropy_with_logits(pred_logits, target_scores, reduction="sum")
        weight = target_scores[fg].sum(-1)  # [P]
        target_bboxes = assigned.bboxes / anchor_stride  # grid units
        loss_box = (complete_box_iou_loss(pred_bboxes[fg], target_bboxes[fg], eps=1e-7) * weight).sum()
        target_ltrb = bbox2dist(anchors, target_bboxes, self.reg_max - 1)  # clamped to reg_max - 1.01
        loss_dfl = (self.dfl(pred_dist[fg].reshape(-1, self.reg_max), target_ltrb[fg]) * weight).sum()

        box_gain, cls_gain, dfl_gain = self.gains
        terms = torch.stack((box_gain * loss_box, cls_gain * loss_cls, dfl_gain * loss_dfl))
        norm = norm.detach()
        return LossOutput(total=terms.sum(), norm=norm, items=terms.detach() / norm.clamp(min=1))

    def decode(self, anchors: torch.Tensor, pred_dist: torch.Tensor) -> torch.Tensor:
        """DFL bins [B, N, 4*reg_max] -> xyxy boxes [B, N, 4] in grid units (expectation of each side's softmax)."""
        b, n, _ = pred_dist.shape
        bins = torch.arange(self.reg_max, dtype=pred_dist.dtype, device=pred_dist.device)
        dist = pred_dist.view(b, n, 4, self.reg_max).softmax(3).matmul(bins)
        return dist2bbox(dist, anchors, xywh=False)

    def dfl(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Distribution focal loss (arXiv:2006.04388): logits [P*4, reg_max], targets [P, 4] -> [P], mean of 4 sides."""
        left = target.long()
        w_left = (left + 1) - target
        logp = F.log_softmax(logits, dim=1)
        right_logp = logp.gather(1, (left + 1).view(-1, 1)).view(left.shape)
        left_logp = logp.gather(1, left.view(-1, 1)).view(left.shape)
        return -(left_logp * w_left + right_logp * (1 - w_left)).mean(-1)

    @staticmethod
    def targets(batch: dict[str, Any], batch_size: int, imgsz: torch.Tensor,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Labels -> per-image padded (classes [B,M,1], xyxy pixel boxes [B,M,4], valid [B,M,1])."""
        idx = torch.as_tensor(batch["batch_idx"], device=device).view(-1).long()
        cls = torch.as_tensor(batch["cls"], device=device, dtype=imgsz.dtype).view(-1, 1)
        boxes = torch.as_tensor(batch["bboxes"], device=device, dtype=imgsz.dtype).view(-1, 4)
        if idx.numel() and (idx.min() < 0 or idx.max() >= batch_size):
            raise ValueError(f"batch_idx must be in [0, {batch_size}) for a batch of {batch_size} images; "
                             f"got values {idx.min().item()}..{idx.max().item()}")
        counts = torch.bincount(idx, minlength=batch_size)
        m = int(counts.max()) if idx.numel() else 0
        order = torch.argsort(idx, stable=True)  # keep each image's label order
        idx, cls, boxes = idx[order], cls[order], boxes[order]
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(idx.numel(), device=device) - starts[idx]
        gt_labels = torch.zeros(batch_size, m, 1, device=device, dtype=imgsz.dtype)
        gt_bboxes = torch.zeros(batch_size, m, 4, device=device, dtype=imgsz.dtype)
        mask_gt = torch.zeros(batch_size, m, 1, dtype=torch.bool, device=device)
        gt_labels[idx, slot] = cls
        gt_bboxes[idx, slot] = xywh2xyxy(boxes * imgsz[[1, 0, 1, 0]])
        mask_gt[idx, slot] = True
        return gt_labels, gt_bboxes, mask_gt
