"""NMS, box scaling, COCO metrics, validation: against brute force, pycocotools and hand-computed values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torchvision.ops import box_iou

from engines.letterbox import plan_letterbox
from trainer.boxes import xyxy2xywh
from trainer.metrics import evaluate_detections
from trainer.plots import plot_pr_curve, plot_results
from trainer.postprocess import non_max_suppression, scale_boxes
from trainer.validate import Validator, format_metrics

DEMO_CKPT = Path(__file__).resolve().parent / "assets" / "yolov12n-defects.pt"  # trained: meaningful mAPs


def _pred(rows: list[list[float]], nc: int) -> torch.Tensor:
    """Rows of (x1, y1, x2, y2, class, score) -> one image's [1, 4 + nc, N] head output (xywh, class scores)."""
    out = torch.zeros(1, 4 + nc, len(rows))
    for j, (x1, y1, x2, y2, c, s) in enumerate(rows):
        out[0, :4, j] = xyxy2xywh(torch.tensor([x1, y1, x2, y2]))
        out[0, 4 + int(c), j] = s
    return out


# ----------------------------------------------------------------------------- NMS
def test_nms_is_class_aware_unless_agnostic() -> None:
    pred = _pred([[10, 10, 50, 50, 0, 0.9], [12, 12, 52, 52, 1, 0.8], [11, 11, 51, 51, 0, 0.7]], nc=2)
    aware = non_max_suppression(pred, conf=0.25, iou=0.5)[0]
    assert aware[:, 5].tolist() == [0.0, 1.0] and aware[:, 4].tolist() == pytest.approx([0.9, 0.8])
    torch.testing.assert_close(aware[0, :4], torch.tensor([10.0, 10, 50, 50]))
    agnostic = non_max_suppression(pred, conf=0.25, iou=0.5, agnostic=True)[0]
    assert agnostic.shape == (1, 6) and agnostic[0, 4] == pytest.approx(0.9)


def test_nms_conf_threshold_and_max_det() -> None:
    rows = [[i * 20, 0, i * 20 + 10, 10, 0, 0.1 + i * 0.01] for i in range(50)]  # disjoint boxes
    out = non_max_suppression(_pred(rows, nc=1), conf=0.3, iou=0.7)[0]
    assert len(out) == 29 and (out[:, 4] > 0.3).all()  # scores 0.31 .. 0.59; 0.30 itself is not above conf
    assert (out[:-1, 4] >= out[1:, 4]).all()  # best first
    capped = non_max_suppression(_pred(rows, nc=1), conf=0.0, iou=0.7, max_det=7)[0]
    assert len(capped) == 7 and capped[:, 4].tolist() == pytest.approx([0.59 - i * 0.01 for i in range(7)])
    assert non_max_suppression(_pred(rows, nc=1), conf=0.9)[0].shape == (0, 6)


@pytest.mark.parametrize("cls", [0, 4, 30, 79])
def test_nms_of_a_half_precision_model_keeps_small_boxes_apart(cls: int) -> None:
    """A CUDA .pt engine's head gives fp16. Two 16 px boxes (IoU 0.52, NMS at 0.55) must both stay whatever their
    class: batched_nms shifts boxes by class x 640 and in fp16 (4-8 px apart out there) they merged."""
    rows = [[300, 300, 316, 316, cls, 0.9], [305, 300, 321, 316, cls, 0.8], [600, 600, 639, 639, 0, 0.5]]
    out = non_max_suppression(_pred(rows, nc=80).half(), conf=0.25, iou=0.55)[0]
    assert out.dtype == torch.float32 and len(out) == 3, out


def test_nms_multi_label_keeps_each_class_above_conf() -> None:
    pred = _pred([[0, 0, 10, 10, 0, 0.6]], nc=3)
    pred[0, 4 + 2, 0] = 0.4
    assert len(non_max_suppression(pred, conf=0.3)[0]) == 1
    multi = non_max_suppression(pred, conf=0.3, multi_label=True)[0]
    assert multi[:, 5].tolist() == [0.0, 2.0]


def _brute_force_nms(pred: torch.Tensor, conf: float, iou: float) -> torch.Tensor:
    """Greedy NMS written out: best class per anchor, highest score first, suppress same-class overlaps > iou."""
    x = pred[0].T
    boxes = torch.cat((x[:, :2] - x[:, 2:4] / 2, x[:, :2] + x[:, 2:4] / 2), 1)
    score, cls = x[:, 4:].max(1)
    order = [int(i) for i in torch.argsort(score, descending=True) if score[i] > conf]
    overlap, cls_list = box_iou(boxes, boxes).tolist(), cls.tolist()
    kept: list[int] = []
    for i in order:
        if all(cls_list[i] != cls_list[k] or overlap[i][k] <= iou for k in kept):
            kept.append(i)
    return torch.cat((boxes[kept], score[kept, None], cls[kept, None].float()), 1)


def test_nms_agrees_with_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    nc, n = 3, 400
    xy = torch.rand(n, 2, generator=g) * 200
    wh = torch.rand(n, 2, generator=g) * 60 + 5
    scores = torch.rand(n, nc, generator=g)
    pred = torch.cat((xy, wh, scores), 1).T.unsqueeze(0)
    ours = non_max_suppression(pred, conf=0.25, iou=0.5, max_det=1000)[0]
    torch.testing.assert_close(ours, _brute_force_nms(pred, 0.25, 0.5))


def test_nms_rejects_a_wrong_layout() -> None:
    with pytest.raises(ValueError, match=r"\[B, 4 \+ nc, N\]"):
        non_max_suppression(torch.zeros(2, 100))


@pytest.mark.parametrize(("src_hw", "input_hw"), [((360, 640), (192, 320)), ((480, 300), (320, 224)),
                                                  ((333, 333), (320, 320))])
def test_scale_boxes_inverts_the_serving_letterbox(src_hw: tuple[int, int], input_hw: tuple[int, int]) -> None:
    lb = plan_letterbox(src_hw, input_hw)
    original = torch.tensor([[10.0, 20.0, 110.0, 90.0], [0.0, 0.0, src_hw[1], src_hw[0]]])
    rh, rw = lb.new_hw[0] / src_hw[0], lb.new_hw[1] / src_hw[1]
    boxed = original * torch.tensor([rw, rh, rw, rh]) + torch.tensor([lb.left, lb.top, lb.left, lb.top])
    for ratio_pad in (None, ((rh, rw), (lb.left, lb.top))):
        torch.testing.assert_close(scale_boxes(boxed, input_hw, src_hw, ratio_pad), original, rtol=0, atol=1e-3)
    assert scale_boxes(torch.tensor([[-5.0, -5.0, 1e4, 1e4]]), input_hw, src_hw)[0].tolist() == \
        [0.0, 0.0, float(src_hw[1]), float(src_hw[0])]


# ----------------------------------------------------------------------------- metrics
NAMES = {0: "scratch", 1: "dent", 2: "crack"}


def _random_set(seed: int = 0, images: int = 30) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Labels (class, xyxy) and noisy predictions (jittered, misclassified, spurious) in original pixels."""
    rng = np.random.default_rng(seed)
    preds, labels = [], []
    for _ in range(images):
        m = int(rng.integers(0, 7))
        xy, wh = rng.uniform(0, 400, (m, 2)), rng.uniform(8, 120, (m, 2))
        lab = np.c_[rng.integers(0, 3, m), xy, xy + wh]
        k = int(rng.integers(0, 5))
        rxy, rwh = rng.uniform(0, 400, (k, 2)), rng.uniform(8, 120, (k, 2))
        boxes = np.r_[lab[:, 1:] + rng.normal(0, 5, (m, 4)), np.c_[rxy, rxy + rwh]]
        cls = np.r_[np.where(rng.random(m) < 0.85, lab[:, 0], rng.integers(0, 3, m)), rng.integers(0, 3, k)]
        preds.append(np.c_[boxes, rng.random(m + k), cls])
        labels.append(lab)
    return preds, labels


def test_perfect_predictions_score_one() -> None:
    _, labels = _random_set()
    perfect = [np.c_[lab[:, 1:], np.full(len(lab), 0.9), lab[:, 0]] for lab in labels]
    m = evaluate_detections(perfect, labels, NAMES)
    assert (m.map50_95, m.map50, m.precision, m.recall) == (1.0, 1.0, 1.0, 1.0)
    assert set(m.per_class) == set(NAMES.values())
    assert sum(v["instances"] for v in m.per_class.values()) == sum(len(lab) for lab in labels)
    assert all(v["ap50_95"] == 1.0 for v in m.per_class.values())


def test_shifted_boxes_score_the_known_value() -> None:
    """A 100x100 box predicted 12 px to the right: IoU 88/112 = 0.786, a match at 6 of COCO's 10 thresholds."""
    labels = [np.array([[0, 50.0, 50.0, 150.0, 150.0]]), np.array([[1, 10.0, 10.0, 110.0, 110.0]])]
    preds = [np.array([[62.0, 50.0, 162.0, 150.0, 0.8, 0]]), np.array([[10.0, 10.0, 110.0, 110.0, 0.7, 1]])]
    m = evaluate_detections(preds, labels, NAMES)
    assert m.per_class["scratch"]["ap50_95"] == pytest.approx(0.6)
    assert m.per_class["dent"]["ap50_95"] == pytest.approx(1.0)
    assert m.map50_95 == pytest.approx(0.8) and m.map50 == pytest.approx(1.0)
    assert "crack" not in m.per_class  # no labels: not part of the mean (COCO and ultralytics alike)
    # a false positive above the true one halves precision at full recall for that class
    preds[1] = np.r_[preds[1], [[300.0, 300.0, 350.0, 350.0, 0.95, 1]]]
    assert evaluate_detections(preds, labels, NAMES).per_class["dent"]["ap50"] == pytest.approx(0.5, abs=0.01)


def test_map_equals_pycocotools() -> None:
    pytest.importorskip("pycocotools", reason="pycocotools (the reference COCO implementation) is not installed")
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    preds, labels = _random_set(seed=1, images=40)
    ours = evaluate_detections(preds, labels, NAMES)
    gt, anns, dts = COCO(), [], []
    for i, (p, lab) in enumerate(zip(preds, labels), start=1):
        anns += [{"id": len(anns) + j, "image_id": i, "category_id": int(c) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                  "area": (x2 - x1) * (y2 - y1), "iscrowd": 0} for j, (c, x1, y1, x2, y2) in enumerate(lab, start=1)]
        dts += [{"image_id": i, "category_id": int(c) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
                for x1, y1, x2, y2, s, c in p]
    gt.dataset = {"images": [{"id": i} for i in range(1, len(labels) + 1)], "annotations": anns,
                  "categories": [{"id": k + 1, "name": v} for k, v in NAMES.items()]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dts), "bbox")
        ev.params.maxDets = [300]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][:, :, :, 0, -1]
    assert 0.2 < ours.map50_95 < 0.9
    assert ours.map50_95 == pytest.approx(precision[precision > -1].mean(), abs=1e-3)
    assert ours.map50 == pytest.approx(precision[0][precision[0] > -1].mean(), abs=1e-3)


def test_precision_recall_equal_ultralytics(ultralytics) -> None:
    """P and R at the best-F1 confidence are ultralytics' own (their matching and ap_per_class on the same set)."""
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.utils.metrics import ap_per_class

    class Matcher(BaseValidator):
        def __init__(self) -> None:  # only what match_predictions reads
            self.iouv = torch.linspace(0.5, 0.95, 10)

    preds, labels = _random_set(seed=2, images=40)
    tp, conf, pred_cls, target_cls = [], [], [], []
    for p, lab in zip(preds, labels):
        p = p[np.argsort(-p[:, 4], kind="stable")]
        target_cls.append(lab[:, 0])
        iou = box_iou(torch.tensor(lab[:, 1:]), torch.tensor(p[:, :4]))
        tp.append(Matcher().match_predictions(torch.tensor(p[:, 5]), torch.tensor(lab[:, 0]), iou).numpy())
        conf.append(p[:, 4])
        pred_cls.append(p[:, 5])
    _, _, p, r, _, ap = ap_per_class(*(np.concatenate(x) for x in (tp, conf, pred_cls, target_cls)))[:6]
    ours = evaluate_detections(preds, labels, NAMES)
    assert ours.precision == pytest.approx(p.mean(), abs=1e-6) and ours.recall == pytest.approx(r.mean(), abs=1e-6)
    assert ours.map50_95 == pytest.approx(ap.mean(), abs=0.01)  # AP integration differs: COCO steps, theirs trapz


def test_no_detections_and_no_labels() -> None:
    _, labels = _random_set()
    m = evaluate_detections([np.zeros((0, 6))] * len(labels), labels, NAMES)
    assert (m.map50_95, m.map50, m.precision, m.recall) == (0.0, 0.0, 0.0, 0.0)
    empty = evaluate_detections([np.zeros((0, 6))], [np.zeros((0, 5))], NAMES)
    assert empty.map50_95 == 0.0 and empty.per_class == {}
    with pytest.raises(ValueError, match="label class 7"):
        evaluate_detections([np.zeros((0, 6))], [np.array([[7, 0, 0, 5, 5]])], NAMES)


# ----------------------------------------------------------------------------- validation
class _OracleModel(torch.nn.Module):
    """A stand-in detector whose eval output is the ground truth of the batch it was built from (xywh input pixels)."""

    def __init__(self, boxes_xyxy: list[torch.Tensor], classes: list[torch.Tensor], nc: int, anchors: int = 64):
        super().__init__()
        self.nc = nc
        self.out = torch.zeros(len(boxes_xyxy), 4 + nc, anchors)
        for i, (b, c) in enumerate(zip(boxes_xyxy, classes)):
            self.out[i, :4, : len(b)] = xyxy2xywh(b).T
            self.out[i, 4 + c.long(), torch.arange(len(b))] = 0.9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out[: x.shape[0]]


def _letterboxed_batch(src_hw: tuple[int, int], input_hw: tuple[int, int], boxes: list[torch.Tensor],
                       classes: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
    """A batch in the trainer.data layout (normalised cxcywh of the padded input) and the boxes in input pixels."""
    lb = plan_letterbox(src_hw, input_hw)
    rh, rw = lb.new_hw[0] / src_hw[0], lb.new_hw[1] / src_hw[1]
    scale, shift = torch.tensor([rw, rh, rw, rh]), torch.tensor([lb.left, lb.top, lb.left, lb.top], dtype=torch.float)
    in_input = [b * scale + shift for b in boxes]
    h, w = input_hw
    norm = torch.cat([xyxy2xywh(b) / torch.tensor([w, h, w, h]) for b in in_input])
    batch = {"img": torch.zeros(len(boxes), 3, h, w, dtype=torch.uint8),
             "batch_idx": torch.cat([torch.full((len(b),), float(i)) for i, b in enumerate(boxes)]),
             "cls": torch.cat(classes).float().view(-1, 1), "bboxes": norm, "im_file": [f"{i}.jpg" for i in range(2)],
             "ori_shape": [src_hw] * len(boxes), "ratio_pad": [((rh, rw), (lb.left, lb.top))] * len(boxes)}
    return batch, in_input


def test_validator_maps_boxes_back_to_original_pixels(tmp_path) -> None:
    src_hw, input_hw = (360, 640), (192, 320)
    boxes = [torch.tensor([[10.0, 20.0, 200.0, 180.0], [300.0, 100.0, 400.0, 300.0]]),
             torch.tensor([[500.0, 10.0, 630.0, 350.0]])]
    classes = [torch.tensor([0, 2]), torch.tensor([1])]
    batch, in_input = _letterboxed_batch(src_hw, input_hw, boxes, classes)
    det, lab = Validator._to_original(batch, 0, torch.zeros(0, 6), input_hw)
    np.testing.assert_allclose(lab[:, 1:], boxes[0].numpy(), atol=1e-3)
    assert lab[:, 0].tolist() == [0, 2] and det.shape == (0, 6)

    model = _OracleModel(in_input, classes, nc=3)
    metrics = Validator([batch], NAMES, "cpu", progress=False)(model)
    assert metrics["mAP50-95"] == pytest.approx(1.0) and metrics["mAP50"] == pytest.approx(1.0)
    assert metrics["precision"] == pytest.approx(1.0) and metrics["recall"] == pytest.approx(1.0)
    assert set(metrics["speed_ms"]) == {"preprocess", "inference", "postprocess"} and metrics["images"] == 2
    assert "crack" in format_metrics(metrics)
    assert plot_pr_curve(metrics, tmp_path / "pr.png").stat().st_size > 0

    shifted = _OracleModel([b + torch.tensor([4.0, 0, 4.0, 0]) for b in in_input], classes, nc=3)
    assert Validator([batch], NAMES, "cpu", progress=False)(shifted)["mAP50-95"] < 0.95


def test_validator_reports_val_losses_and_restores_train_mode() -> None:
    from trainer.loss import DetectionLoss
    from trainer.nn import build_model

    torch.manual_seed(0)
    model = build_model("yolov12n.yaml", nc=3).train()
    boxes = [torch.tensor([[10.0, 20.0, 200.0, 180.0]]), torch.tensor([[500.0, 10.0, 630.0, 350.0]])]
    batch, _ = _letterboxed_batch((360, 640), (96, 160), boxes, [torch.tensor([0]), torch.tensor([1])])
    metrics = Validator([batch], NAMES, "cpu", loss=DetectionLoss(model), progress=False)(model)
    assert model.training and model.head.training
    assert set(metrics["losses"]) == {"box", "cls", "dfl"} and all(v > 0 for v in metrics["losses"].values())
    assert 0.0 <= metrics["mAP50-95"] <= 1.0


def test_plots_from_one_epoch(tmp_path) -> None:
    csv = tmp_path / "results.csv"
    csv.write_text("epoch,train/box_loss,train/cls_loss,metrics/mAP50,metrics/mAP50-95,lr/pg0\n1,1.5,2.0,0.1,0.05,0.01\n")
    assert plot_results(csv, tmp_path / "results.png").stat().st_size > 0
    with csv.open("a") as f:
        f.write("2,1.2,1.7,0.2,0.09,0.009\n")
    assert plot_results(csv, tmp_path / "results2.png").stat().st_size > 0
    with pytest.raises(ValueError, match="no PR curve"):
        plot_pr_curve({"mAP50": 0.0}, tmp_path / "pr.png")


def test_val_without_data_uses_the_dataset_the_checkpoint_was_trained_on(tiny_data, tmp_path) -> None:
    """ultralytics' `model.val()  # no arguments needed, dataset and settings remembered`: after train(), or on a
    best.pt, val() reads the data.yaml the checkpoint names (it said 'no data: pass data=...')."""
    from trainer import YOLO
    from trainer.checkpoint import save_checkpoint
    from trainer.nn import build_model

    model = build_model("yolov12n.yaml", nc=5)
    trained = save_checkpoint(tmp_path / "best.pt", model, imgsz=96, train_args={"data": str(tiny_data)})
    metrics = YOLO(str(trained)).val(batch=4, verbose=False)
    assert metrics["images"] == 4 and metrics["imgsz"] == 96
    moved = save_checkpoint(tmp_path / "moved.pt", model, train_args={"data": str(tmp_path / "gone.yaml")})
    with pytest.raises(ValueError, match=r"^no data: pass data=path/to/data.yaml .*gone.yaml is not there any more"):
        YOLO(str(moved)).val()
    with pytest.raises(ValueError, match=r"^no data: pass data=path/to/data.yaml \(YOLO format: path, train, val, "
                                         r"names\)$"):
        YOLO(model).val()


def test_val_runs_on_the_first_gpu_by_default_as_train_and_predict_do(tiny_data, monkeypatch) -> None:
    """YOLO.val() and yolov12-val with no device: a GPU machine validates on its first GPU (it validated on the CPU,
    while train() and predict() picked the GPU)."""
    import trainer.validate
    from trainer import YOLO
    from trainer.nn import build_model

    class ReachedError(Exception):
        pass

    def validator(loader, names, device, **kw):
        raise ReachedError(str(device))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(trainer.validate, "Validator", validator)
    with pytest.raises(ReachedError, match=r"^cuda:0$"):
        YOLO(build_model("yolov12n.yaml", nc=5)).val(data=str(tiny_data), imgsz=64, verbose=False)
    with pytest.raises(ReachedError, match=r"^cpu$"):
        YOLO(build_model("yolov12n.yaml", nc=5)).val(data=str(tiny_data), imgsz=64, device="cpu", verbose=False)
    with pytest.raises(ReachedError, match=r"^cuda:0$"):
        trainer.validate.val_main(["--weights", str(DEMO_CKPT), "--data", str(tiny_data), "--imgsz", "64"])


def test_val_end_to_end_on_synthetic_defects(tmp_path, capsys) -> None:
    """yolov12-val and YOLO.val on the synthetic defects: the dataset's loader, a checkpoint, the table, the plot."""
    from trainer import YOLO
    from trainer.checkpoint import save_checkpoint
    from trainer.data import synthesize
    from trainer.nn import build_model
    from trainer.validate import val, val_main

    data = synthesize(tmp_path / "defects", images=8, imgsz=128, val_fraction=0.5, seed=0)
    torch.manual_seed(0)
    model = build_model("yolov12n.yaml", nc=5)
    weights = save_checkpoint(tmp_path / "w.pt", model)
    argv = ["--weights", str(weights), "--data", str(data), "--imgsz", "128", "--batch", "2"]
    assert val_main([*argv, "--plots", "--save-dir", str(tmp_path / "val")]) == 0
    out = capsys.readouterr().out
    summary, table = out.split("\n", 1)
    assert summary.startswith("val: 4/4 images used (") and "boxes, no label problems" in summary  # what it ran on
    assert "mAP50-95" in table and "all" in table.split("\n")[1]
    assert (tmp_path / "val" / "PR_curve.png").stat().st_size > 0

    metrics = YOLO(model).val(data=str(data), imgsz=128, batch=4, verbose=False)
    assert metrics["images"] == 4 and 0.0 <= metrics["mAP50-95"] <= metrics["mAP50"] <= 1.0
    assert {"precision", "recall", "per_class", "speed_ms", "pr_curve"} <= set(metrics)
    assert sum(v["instances"] for v in metrics["per_class"].values()) > 0
    small = save_checkpoint(tmp_path / "small.pt", model, imgsz=96)  # trained at 96: validated at 96 unless told
    assert val(str(small), data=str(data), batch=4, verbose=False)["imgsz"] == 96
    assert val(YOLO(str(small)), data=str(data), imgsz=128, batch=4, verbose=False)["imgsz"] == 128

    assert val_main(["--weights", str(weights), "--data", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    two_classes = tmp_path / "two.yaml"
    cfg = yaml.safe_load(data.read_text())
    two_classes.write_text(yaml.safe_dump({**cfg, "nc": 2, "names": ["a", "b"]}))
    with pytest.raises(ValueError, match=r"predicts 5 classes but .*two\.yaml has 2"):
        val(model, data=str(two_classes), imgsz=128, verbose=False)


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory: pytest.TempPathFactory):
    """A random yolov12n checkpoint with the 5 synthetic-defect classes (validating it is quick on tiny_data)."""
    from trainer.checkpoint import save_checkpoint
    from trainer.nn import build_model

    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("w") / "w.pt", build_model("yolov12n.yaml", nc=5), imgsz=64)


@pytest.mark.parametrize(("argv", "message"), [
    (["--conf", "5", "--iou", "-1", "--max-det", "0"], r"conf must be in \[0, 1\), got 5.0"),
    (["--conf", "nan"], r"conf must be in \[0, 1\), got nan"),
    (["--iou", "-1"], r"iou must be in \(0, 1\], got -1.0"),
    (["--max-det", "0"], "max_det must be >= 1, got 0"),
    (["--batch", "0"], "batch must be >= 1, got 0"),
    (["--workers", "-1"], "workers must be >= 0"),
    (["--imgsz", "100"], "imgsz must be a multiple of 32"),
])
def test_val_cli_refuses_out_of_range_options(random_weights, tiny_data, argv, message, capsys) -> None:
    """As predict and export do, before any model or data is loaded (no metrics table, no numpy warning)."""
    import re
    import warnings

    from trainer.validate import val_main

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # `--batch 0` once printed numpy's divide-by-zero warning first
        rc = val_main(["--weights", str(random_weights), "--data", str(tiny_data), *argv])
    out, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1 and re.match(f"yolov12-val: error: {message}", err), err
    assert "mAP50" not in out


def test_val_cli_says_what_it_needs_for_engines_and_unwritable_folders(random_weights, tiny_data, tmp_path,
                                                                      capsys) -> None:
    from trainer.validate import val_main

    onnx_file = tmp_path / "demo.onnx"
    onnx_file.write_bytes(b"\x08\x07\x12\x07pytorch")  # what an ONNX protobuf starts with
    assert val_main(["--weights", str(onnx_file), "--data", str(tiny_data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "val needs a .pt checkpoint" in err and "demo.onnx" in err, err
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    argv = ["--weights", str(random_weights), "--data", str(tiny_data), "--imgsz", "64", "--plots"]
    assert val_main([*argv, "--save-dir", str(blocked / "val")]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and f"cannot create the save folder '{blocked / 'val'}'" in err, err
    assert "mAP50" not in out, "refused before the evaluation, not after it"


# ----------------------------------------------------------------------------- validation in chunks
def _rect_loader(data: Path, batch: int = 8):
    from trainer.data import DetectionDataset, build_dataloader, load_data_config

    cfg = load_data_config(data)
    dataset = DetectionDataset(cfg, "val", imgsz=96, augment=False, rect=True, batch_size=batch, verbose=False)
    return build_dataloader(dataset, batch, 0, shuffle=False), cfg.names


class _OOMAbove:
    """A memory limit on one layer's forward: torch.OutOfMemoryError for more than `most` images at once."""

    def __init__(self, layer: torch.nn.Module, most: int) -> None:
        self.most, self.sizes, self.fired = most, [], 0
        self.handle = layer.register_forward_hook(self._forward)

    def _forward(self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self.sizes.append(inputs[0].shape[0])
        if inputs[0].shape[0] > self.most:
            self.fired += 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")


def _scores(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("mAP50-95", "mAP50", "precision", "recall", "images")}


def test_a_batch_run_in_chunks_scores_as_the_whole_batch(mixed_aspect_data: Path) -> None:
    """Chunks of a rect batch run at the batch's padded shape with BatchNorm in eval: the same mAP, at any chunk size
    (up to the last bits of the CPU convolutions, which may pick other kernels for other batch sizes)."""
    from trainer.checkpoint import load_checkpoint

    loader, names = _rect_loader(mixed_aspect_data)
    model = load_checkpoint(DEMO_CKPT).model
    whole = Validator(loader, names, "cpu", progress=False)(model)
    assert whole["images"] == 24 and whole["mAP50-95"] > 0.01  # a trained model on a real split: a meaningful mAP
    for chunk in (1, 5):
        v = Validator(loader, names, "cpu", progress=False, chunk=chunk)
        scores = _scores(v(model))
        assert (scores["mAP50-95"], scores["mAP50"]) == (whole["mAP50-95"], whole["mAP50"]), chunk
        assert scores == pytest.approx(_scores(whole), abs=1e-6), chunk  # P and R: measured 2e-7 apart at chunk 1
        assert v.chunk == chunk
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        Validator(loader, names, "cpu", chunk=0)


def test_out_of_memory_in_validation_halves_the_chunk_and_scores_the_same(mixed_aspect_data: Path) -> None:
    """An out-of-memory error in a forward of 8 images (injected in a backbone layer while it sees more than 2) is
    survived by halving the chunk to 2, kept for the batches after it, with the metrics of a run without it; out of
    memory even at 1 image is one clear error."""
    from trainer.checkpoint import load_checkpoint

    loader, names = _rect_loader(mixed_aspect_data)
    model = load_checkpoint(DEMO_CKPT).model
    clean = Validator(loader, names, "cpu", progress=False, chunk=8)(model)
    fault = _OOMAbove(model.model[5], most=2)
    v = Validator(loader, names, "cpu", progress=False, chunk=8)
    assert _scores(v(model)) == pytest.approx(_scores(clean), abs=1e-6)
    assert fault.fired == 2 and v.chunk == 2  # 8 -> 4 -> 2, once
    assert fault.sizes == [8, 4] + [2] * 12  # batch 1: 8, 4, then 4 x 2; batches 2 and 3: 4 x 2 each
    assert not model.training

    fault.most = 0
    with pytest.raises(torch.OutOfMemoryError, match="validation ran out of memory even at 1 image per forward"):
        Validator(loader, names, "cpu", progress=False)(model)
    fault.handle.remove()
