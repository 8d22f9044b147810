"""Detection metrics by COCO's definition (faster-coco-eval), reported the way ultralytics reports them.

mAP50-95 and mAP50 are COCO's: greedy matching by score, 101-point interpolated precision, averaged
over IoU 0.50:0.05:0.95 and the classes present in the labels (area range 'all'; `maxDets` raised to
the NMS `max_det` so that no kept detection is ignored). Precision and recall are taken, as
ultralytics does, at the confidence that maximises the class-mean F1 (smoothed), from COCO's own
matches at IoU 0.50.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DetectionMetrics", "MetricsAccumulator", "evaluate_detections"]

_EPS = 1e-16


@dataclass
class DetectionMetrics:
    """Dataset-level metrics, per-class figures and the curves the plots draw."""

    map50_95: float
    map50: float
    precision: float
    recall: float
    per_class: dict[str, dict[str, float]]  # name -> ap50_95, ap50, precision, recall, instances, images
    pr_recall: np.ndarray = field(repr=False)  # [101] recall points (COCO's)
    pr_precision: dict[str, np.ndarray] = field(repr=False)  # name -> [101] interpolated precision at IoU 0.50

    def as_dict(self) -> dict:
        """The validation dict: 'mAP50-95', 'mAP50', 'precision', 'recall', 'per_class' and 'pr_curve'."""
        return {"mAP50-95": self.map50_95, "mAP50": self.map50, "precision": self.precision, "recall": self.recall,
                "per_class": self.per_class,
                "pr_curve": {"recall": self.pr_recall, "precision": self.pr_precision,
                             "ap50": {k: v["ap50"] for k, v in self.per_class.items()}}}


class MetricsAccumulator:
    """Collects per-image predictions and labels (original-image pixels), then computes `DetectionMetrics`."""

    def __init__(self, names: dict[int, str], max_det: int = 300) -> None:
        self.names, self.max_det = dict(names), max_det
        self.predictions: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def add(self, predictions: np.ndarray, labels: np.ndarray) -> None:
        """One image: predictions [n, 6] (x1, y1, x2, y2, score, class), labels [m, 5] (class, x1, y1, x2, y2)."""
        self.predictions.append(np.asarray(predictions, dtype=np.float64).reshape(-1, 6))
        self.labels.append(np.asarray(labels, dtype=np.float64).reshape(-1, 5))

    def compute(self) -> DetectionMetrics:
        """COCO metrics over every image added so far."""
        return evaluate_detections(self.predictions, self.labels, self.names, self.max_det)


def evaluate_detections(predictions: Sequence[np.ndarray], labels: Sequence[np.ndarray], names: dict[int, str],
                        max_det: int = 300) -> DetectionMetrics:
    """Per-image predictions [n, 6] (x1, y1, x2, y2, score, class) and labels [m, 5] (class, x1, y1, x2, y2)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} prediction arrays for {len(labels)} label arrays: one of each per image")
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"class names must be keyed 0..nc-1, got keys {sorted(names)}")
    predictions = [np.asarray(p, dtype=np.float64).reshape(-1, 6) for p in predictions]
    labels = [np.asarray(lab, dtype=np.float64).reshape(-1, 5) for lab in labels]
    gt, dt = _to_coco(predictions, labels, names)
    max_det = max(max_det, max((len(p) for p in predictions), default=0))  # never ignore a kept detection
    full = _coco_eval(gt, dt, max_det)
    precision = full.eval["precision"][:, :, :, 0, 0]  # [T, R, K]: area 'all', the one maxDets; -1 = no labels
    p50 = precision[0]

    label_cls = [lab[:, 0].astype(np.int64) for lab in labels]
    instances = np.bincount(np.concatenate([np.zeros(0, np.int64), *label_cls]), minlength=len(names))
    images = np.bincount(np.concatenate([np.zeros(0, np.int64), *(np.unique(c) for c in label_cls)]),
                         minlength=len(names))
    present = [c for c in range(len(names)) if instances[c] > 0]
    tp, conf, pred_cls = _matches_at_50(dt, _coco_eval(gt, dt, max_det, iou_thrs=[0.5]))
    p, r = _precision_recall_at_best_f1(tp, conf, pred_cls, present, instances)

    per_class = {names[c]: {"ap50_95": float(precision[:, :, c].mean()), "ap50": float(p50[:, c].mean()),
                            "precision": float(pi), "recall": float(ri),
                            "instances": int(instances[c]), "images": int(images[c])}
                 for c, pi, ri in zip(present, p, r)}
    return DetectionMetrics(
        map50_95=float(precision[precision > -1].mean()) if present else 0.0,
        map50=float(p50[p50 > -1].mean()) if present else 0.0,
        precision=float(p.mean()) if present else 0.0, recall=float(r.mean()) if present else 0.0,
        per_class=per_class, pr_recall=np.asarray(full.params.recThrs),
        pr_precision={names[c]: p50[:, c].copy() for c in present})


def _to_coco(predictions: list[np.ndarray], labels: list[np.ndarray], names: dict[int, str]):
    """COCO gt and detection objects: image ids 1.., category id = class + 1, boxes as [x, y, w, h]."""
    from faster_coco_eval import COCO

    annotations, detections = [], []
    for i, (pred, lab) in enumerate(zip(predictions, labels), start=1):
        for c, x1, y1, x2, y2 in lab.tolist():  # Python floats: fast to walk, plain to store
            if not 0 <= int(c) < len(names):
                raise ValueError(f"label class {int(c)} of image {i - 1} is outside 0..{len(names) - 1}")
            w, h = x2 - x1, y2 - y1
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(c) + 1,
                                "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0})
        for x1, y1, x2, y2, score, c in pred.tolist():
            if 0 <= int(c) < len(names):  # a class the dataset does not have cannot match anything
                detections.append({"image_id": i, "category_id": int(c) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                   "score": score})
    gt = COCO()
    gt.dataset = {"images": [{"id": i} for i in range(1, len(labels) + 1)], "annotations": annotations,
                  "categories": [{"id": c + 1, "name": str(names[c])} for c in range(len(names))]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(detections)
    return gt, dt


def _coco_eval(gt, dt, max_det: int, iou_thrs: list[float] | None = None):
    """Run COCO's evaluate + accumulate for boxes; returns the evaluator (its `.eval` holds the arrays)."""
    from faster_coco_eval import COCOeval_faster

    ev = COCOeval_faster(gt, dt, "bbox", print_function=lambda *a, **k: None)
    ev.params.maxDets = [max_det]
    ev.params.areaRng, ev.params.areaRngLbl = [[0.0, 1e10]], ["all"]  # COCO's 'all' range only
    if iou_thrs is not None:
        ev.params.iouThrs = np.asarray(iou_thrs, dtype=np.float64)
    ev.evaluate()
    ev.accumulate()
    return ev


def _matches_at_50(dt, ev50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per detection: true positive at IoU 0.50 (COCO's greedy matching), score, class index."""
    matched = {int(k.split("_", 1)[0]) for k in ev50.eval["matched"]}
    anns = list(dt.anns.values())
    tp = np.array([a["id"] in matched for a in anns], dtype=np.float64)
    conf = np.array([a["score"] for a in anns], dtype=np.float64)
    cls = np.array([a["category_id"] - 1 for a in anns], dtype=np.int64)
    return tp, conf, cls


def _precision_recall_at_best_f1(tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray, classes: list[int],
                                 instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class precision and recall at the one confidence (of 1000) maximising the smoothed class-mean F1."""
    px = np.linspace(0, 1, 1000)
    p, r = np.zeros((len(classes), px.size)), np.zeros((len(classes), px.size))
    order = np.argsort(-conf, kind="stable")
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]
    for i, c in enumerate(classes):
        sel = pred_cls == c
        if not sel.any():
            continue
        tpc, fpc = tp[sel].cumsum(), (1 - tp[sel]).cumsum()
        r[i] = np.interp(-px, -conf[sel], tpc / (instances[c] + _EPS), left=0)
        p[i] = np.interp(-px, -conf[sel], tpc / (tpc + fpc), left=1)
    if not classes:
        return p[:, 0], r[:, 0]
    f1 = 2 * p * r / (p + r + _EPS)
    best = int(_smooth(f1.mean(0), 0.1).argmax())
    return p[:, best], r[:, best]


def _smooth(y: np.ndarray, fraction: float) -> np.ndarray:
    """Box filter over `fraction` of the points, edges padded with the end values (ultralytics' `smooth`)."""
    nf = round(len(y) * fraction * 2) // 2 + 1
    pad = np.ones(nf // 2)
    return np.convolve(np.concatenate((pad * y[0], y, pad * y[-1])), np.ones(nf) / nf, mode="valid")
