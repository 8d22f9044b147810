"""Post-processing of the eval-mode head output: NMS and mapping boxes back to the original image.

This is the reference the ONNX / TensorRT engines are compared against: kept exact and simple.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import batched_nms, nms

from .boxes import xywh2xyxy

__all__ = ["non_max_suppression", "scale_boxes"]


def non_max_suppression(pred: torch.Tensor, conf: float = 0.25, iou: float = 0.7, max_det: int = 300,
                        agnostic: bool = False, max_nms: int = 30000,
                        multi_label: bool = False) -> list[torch.Tensor]:
    """[B, 4+nc, N] (xywh pixels, class scores) -> per image [n, 6] (x1, y1, x2, y2, score, class), best first.

    Each anchor keeps its best class (`multi_label=True`: every class scoring above `conf`, as
    ultralytics' validation does); candidates scoring <= `conf` are dropped, at most `max_nms` of the
    highest go to NMS, which is per class (torchvision `batched_nms`) unless `agnostic`.
    """
    if pred.ndim != 3 or pred.shape[1] < 5:
        raise ValueError(f"expected predictions [B, 4 + nc, N], got {tuple(pred.shape)}")
    out = []
    for x in pred.transpose(1, 2):  # [N, 4 + nc] per image
        boxes, scores = x[:, :4], x[:, 4:]
        if multi_label and scores.shape[1] > 1:
            anchor, cls = (scores > conf).nonzero(as_tuple=True)
            score = scores[anchor, cls]
        else:
            score, cls = scores.max(1)
            anchor = (score > conf).nonzero(as_tuple=True)[0]
            score, cls = score[anchor], cls[anchor]
        if score.numel() > max_nms:
            top = score.topk(max_nms).indices
            anchor, score, cls = anchor[top], score[top], cls[top]
        # fp32 from here (fp16 CUDA models give half): batched_nms shifts each class's boxes by class x (largest
        # coordinate + 1), thousands of pixels, where fp16's spacing (4-8 px) merges or splits small defects
        xyxy, score = xywh2xyxy(boxes[anchor].float()), score.float()
        keep = nms(xyxy, score, iou) if agnostic else batched_nms(xyxy, score, cls, iou)
        keep = keep[:max_det]
        out.append(torch.cat((xyxy[keep], score[keep, None], cls[keep, None].to(xyxy.dtype)), 1))
    return out


def scale_boxes(boxes: torch.Tensor, input_hw: Sequence[int], ori_hw: Sequence[int],
                ratio_pad: Sequence | None = None) -> torch.Tensor:
    """xyxy boxes (any leading shape, last dim >= 4) in network-input pixels -> original-image pixels, clipped.

    `ratio_pad` = ((ratio_h, ratio_w), (pad_w, pad_h)) as the dataset recorded it; without it the
    centred letterbox of `ori_hw` into `input_hw` is assumed. Returns a new tensor.
    """
    boxes = boxes.clone()
    if ratio_pad is None:
        gain = min(input_hw[0] / ori_hw[0], input_hw[1] / ori_hw[1])
        new_h, new_w = max(round(ori_hw[0] * gain), 1), max(round(ori_hw[1] * gain), 1)
        gain_h, gain_w = new_h / ori_hw[0], new_w / ori_hw[1]
        pad_w, pad_h = (input_hw[1] - new_w) // 2, (input_hw[0] - new_h) // 2
    else:
        (gain_h, gain_w), (pad_w, pad_h) = ratio_pad
    boxes[..., [0, 2]] = ((boxes[..., [0, 2]] - pad_w) / gain_w).clamp(0, ori_hw[1])
    boxes[..., [1, 3]] = ((boxes[..., [1, 3]] - pad_h) / gain_h).clamp(0, ori_hw[0])
    return boxes
