"""DetectionLoss and TaskAlignedAssigner: equal to ultralytics' v8DetectionLoss, exact under batch splitting."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from trainer.assigner import TaskAlignedAssigner
from trainer.loss import DetectionLoss
from trainer.nn import build_model

NC = 3


def _batch(images: int, per_image: list[int], seed: int = 0) -> dict:
    """Random labels (normalised cxcywh), some overlapping, some tiny; per_image[i] objects in image i."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.full((n,), float(i)) for i, n in enumerate(per_image)]) if per_image else torch.zeros(0)
    m = idx.numel()
    cxcy = torch.rand(m, 2, generator=g) * 0.7 + 0.15
    wh = torch.rand(m, 2, generator=g) * 0.45 + 0.01
    if m > 2:
        cxcy[1], wh[1] = cxcy[0] + 0.02, wh[0] * 0.9  # a near-duplicate: anchors claimed by two boxes
    return {"img": torch.zeros(images, 3, 1, 1, dtype=torch.uint8), "batch_idx": idx,
            "cls": torch.randint(0, NC, (m, 1), generator=g).float(), "bboxes": torch.cat((cxcy, wh), 1)}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """Our yolov12n-v1 (ultralytics' yolo12n layout), BatchNorm in eval mode so that images are independent."""
    torch.manual_seed(0)
    model = build_model("yolov12n-v1.yaml", nc=NC).train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    return model


@pytest.fixture(scope="module")
def maps(model) -> list[torch.Tensor]:
    """The train-mode head output for 4 random images at 96x128."""
    torch.manual_seed(1)
    with torch.no_grad():
        return [m.detach() for m in model(torch.rand(4, 3, 96, 128))]


@pytest.fixture(scope="module")
def oracle(ultralytics, model):
    """ultralytics' v8DetectionLoss on their yolo12n carrying our weights (the state-dict keys are identical)."""
    from ultralytics.nn.tasks import DetectionModel as UltralyticsModel
    from ultralytics.utils.loss import v8DetectionLoss

    theirs = UltralyticsModel("yolo12n.yaml", nc=NC, verbose=False)
    theirs.load_state_dict(model.state_dict())
    theirs.args = SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)
    return v8DetectionLoss(theirs)


@pytest.mark.parametrize("per_image", [[4, 3, 1, 5], [4, 0, 2, 0], [0, 0, 0, 0]], ids=["all", "some-empty", "none"])
def test_equals_ultralytics_v8_detection_loss(model, maps, oracle, per_image: list[int]) -> None:
    criterion = DetectionLoss(model, box=7.5, cls=0.5, dfl=1.5)
    b = len(per_image)
    maps = [m.clone().requires_grad_() for m in maps]
    batch = _batch(b, per_image)
    preds = {"boxes": torch.cat([m[:, :64].flatten(2) for m in maps], 2),
             "scores": torch.cat([m[:, 64:].flatten(2) for m in maps], 2), "feats": maps}
    their_loss, their_items = oracle(preds, batch)
    their_grads = torch.autograd.grad(their_loss.sum(), maps)

    out = criterion(maps, batch)
    scale = b / out.norm.clamp(min=1)
    our_grads = torch.autograd.grad(out.total, maps)

    assert not out.norm.requires_grad and not out.items.requires_grad and out.total.requires_grad
    torch.testing.assert_close(out.total * scale, their_loss.sum().detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.items, torch.stack(list(their_items.values())), rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(our_grads, their_grads):
        assert torch.isfinite(mine).all()
        torch.testing.assert_close(mine * scale, theirs, rtol=1e-5, atol=1e-7)
    if sum(per_image) == 0:
        assert out.norm == 0 and out.items[0] == 0 and out.items[2] == 0 and out.items[1] > 0


def test_split_batch_sums_to_the_whole_batch(model) -> None:
    """(total_a + total_b) / max(norm_a + norm_b, 1) == whole-batch total / norm, forward and parameter gradients."""
    criterion = DetectionLoss(model)
    torch.manual_seed(2)
    x = torch.rand(4, 3, 96, 128)
    batch = _batch(4, [3, 0, 5, 2], seed=3)

    def step(sl: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        keep = (batch["batch_idx"] >= sl.start) & (batch["batch_idx"] < sl.stop)
        part = {"batch_idx": batch["batch_idx"][keep] - sl.start, "cls": batch["cls"][keep],
                "bboxes": batch["bboxes"][keep]}
        out = criterion(model(x[sl]), part)
        out.total.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return out.total.detach(), out.norm, grads

    total, norm, grads = step(slice(0, 4))
    total_a, norm_a, grads_a = step(slice(0, 2))
    total_b, norm_b, grads_b = step(slice(2, 4))
    assert norm > 0 and norm_a > 0 and norm_b > 0
    torch.testing.assert_close(norm_a + norm_b, norm, rtol=1e-5, atol=0)
    torch.testing.assert_close((total_a + total_b) / (norm_a + norm_b).clamp(min=1), total / norm.clamp(min=1),
                               rtol=1e-5, atol=0)
    split = (grads_a + grads_b) / (norm_a + norm_b).clamp(min=1)
    whole = grads / norm.clamp(min=1)
    assert torch.isfinite(whole).all() and whole.abs().max() > 0
    assert (split - whole).norm() <= 1e-5 * whole.norm()  # relative over the whole gradient vector
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-6)  # and no single element off (float32 sums)
    model.zero_grad(set_to_none=True)


def test_loss_rejects_labels_for_missing_images(model, maps) -> None:
    with pytest.raises(ValueError, match=r"batch_idx must be in \[0, 4\)"):
        DetectionLoss(model)(maps, _batch(5, [1, 1, 1, 1, 1]))


# ----------------------------------------------------------------------------- assigner
def _grid(size: int = 64, stride: int = 8) -> torch.Tensor:
    c = torch.arange(stride / 2, size, stride, dtype=torch.float32)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack((xx.flatten(), yy.flatten()), 1)  # [N, 2] pixels


def test_assigner_topk_inside_box_and_soft_targets() -> None:
    anchors = _grid()
    n = anchors.shape[0]
    gt = torch.tensor([[[12.0, 12.0, 44.0, 44.0]]])  # 9 anchor centres strictly inside, (28, 28) at its centre
    # predictions: each anchor predicts the gt moved to its own centre, so IoU falls with distance
    pd = (gt[0, 0] - 28.0 + anchors.repeat(1, 2)).unsqueeze(0)
    scores = torch.full((1, n, 2), 0.5)
    a = TaskAlignedAssigner(topk=5, num_classes=2)(scores, pd, anchors, torch.tensor([[[1.0]]]), gt,
                                                   torch.ones(1, 1, 1, dtype=torch.bool))
    assert int(a.fg_mask.sum()) == 5
    fg_xy = anchors[a.fg_mask[0]]
    assert ((fg_xy > 12) & (fg_xy < 44)).all()
    assert (a.labels[0][a.fg_mask[0]] == 1).all() and a.scores[0, :, 0].sum() == 0
    centre = int(((anchors - 28).abs().sum(1) == 0).nonzero())
    assert a.fg_mask[0, centre]
    torch.testing.assert_close(a.scores[0, :, 1].max(), a.scores[0, centre, 1])  # best aligned: the exact box
    torch.testing.assert_close(a.scores[0, centre, 1], torch.tensor(1.0))  # ... whose target is its IoU, 1
    assert (a.scores[0, ~a.fg_mask[0]] == 0).all() and (a.scores[0, a.fg_mask[0], 1] < 1.0 + 1e-6).all()


def test_assigner_conflict_goes_to_higher_iou_and_tiny_boxes_get_anchors() -> None:
    anchors = _grid()
    n = anchors.shape[0]
    big, small = [4.0, 4.0, 60.0, 60.0], [20.0, 20.0, 36.0, 36.0]
    gt = torch.tensor([[big, small]])
    pd = torch.tensor(small).expand(1, n, 4).clone()  # every anchor predicts the small box exactly
    scores = torch.full((1, n, 1), 0.9)
    labels, valid = torch.zeros(1, 2, 1), torch.ones(1, 2, 1, dtype=torch.bool)
    a = TaskAlignedAssigner(topk=4, num_classes=1)(scores, pd, anchors, labels, gt, valid)
    inside_small = ((anchors > 20) & (anchors < 36)).all(1)
    assert (a.gt_idx[0][inside_small & a.fg_mask[0]] == 1).all()  # claimed by both: the higher IoU wins
    assert a.fg_mask[0][inside_small].all()

    tiny = torch.tensor([[[30.0, 30.0, 31.0, 33.0]]])  # no anchor centre lies inside
    args = (torch.full((1, n, 1), 0.5), tiny.expand(1, n, 4).clone(), anchors, torch.zeros(1, 1, 1), tiny,
            torch.ones(1, 1, 1, dtype=torch.bool))
    assert TaskAlignedAssigner(num_classes=1, min_gt_side=0)(*args).fg_mask.sum() == 0
    assert TaskAlignedAssigner(num_classes=1, min_gt_side=16)(*args).fg_mask.sum() > 0
