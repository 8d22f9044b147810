"""Host-side NMS for engines whose graph ends at the raw head ([B, 4+nc, N]: `--raw` and ultralytics exports).

Same rule as the in-graph NMS and trainer.postprocess: each anchor keeps its best class, scores
<= conf are dropped, at most `max_nms` candidates, greedy NMS per class, the `max_det` best kept.
`nms_numpy` keeps the ONNX Runtime path free of torch; `nms_torch` serves GPU backends (torchvision).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["nms_numpy", "nms_torch"]


def _greedy(boxes: np.ndarray, iou: float, max_det: int) -> list[int]:
    """Indices kept by greedy NMS over `boxes` (float64 xyxy, already sorted best first)."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1).clip(0) * (y2 - y1).clip(0)
    order = np.arange(len(boxes))
    keep: list[int] = []
    while order.size and len(keep) < max_det:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = (np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest])).clip(0)
        h = (np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest])).clip(0)
        inter = w * h
        union = areas[i] + areas[rest] - inter
        order = rest[inter <= iou * np.maximum(union, 1e-12)]
    return keep


def nms_numpy(pred: np.ndarray, conf: float = 0.25, iou: float = 0.7, max_det: int = 300,
              max_nms: int = 30000) -> list[np.ndarray]:
    """[B, 4+nc, N] (xywh pixels, class scores) -> per image float32 [n, 6] (x1, y1, x2, y2, score, class)."""
    out = []
    for x in np.asarray(pred, dtype=np.float32):
        scores = x[4:]
        cls = scores.argmax(0)
        score = np.take_along_axis(scores, cls[None], 0)[0]
        idx = np.flatnonzero(score > conf)
        idx = idx[np.argsort(-score[idx], kind="stable")][:max_nms]
        xywh = x[:4, idx].T.astype(np.float64)
        xyxy = np.concatenate((xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), 1)
        # per-class NMS as one pass: shift each class into its own region (float64 keeps the IoUs exact)
        offset = cls[idx, None] * (np.abs(xyxy).max(initial=0.0) + 1.0)
        keep = _greedy(xyxy + offset, iou, max_det)
        det = np.concatenate((xyxy[keep], score[idx][keep, None], cls[idx][keep, None]), 1)
        out.append(det.astype(np.float32).reshape(-1, 6))
    return out


def nms_torch(pred: Any, conf: float = 0.25, iou: float = 0.7, max_det: int = 300,
              max_nms: int = 30000) -> list[Any]:
    """The same on a torch [B, 4+nc, N] tensor (any device) with torchvision's batched_nms; [n, 6] float tensors."""
    import torch
    from torchvision.ops import batched_nms, box_convert

    out = []
    for x in pred.float().transpose(1, 2):
        score, cls = x[:, 4:].max(1)
        idx = (score > conf).nonzero(as_tuple=True)[0]
        if idx.numel() > max_nms:
            idx = idx[score[idx].topk(max_nms).indices]
        xyxy = box_convert(x[idx, :4], "cxcywh", "xyxy")
        keep = batched_nms(xyxy, score[idx], cls[idx], iou)[:max_det]
        out.append(torch.cat((xyxy[keep], score[idx][keep, None], cls[idx][keep, None].float()), 1))
    return out
