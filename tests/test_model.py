"""The YOLOv12 model: every config builds with the published parameter count, forward/backward, fuse, attention."""

from __future__ import annotations

import pytest
import torch

from trainer import YOLO
from trainer.nn import DFL, MODEL_CONFIGS, AAttn, AAttnV1, build_model

PUBLISHED = {  # nc = 80, from the official repository / ultralytics model summaries
    "yolov12n.yaml": 2_553_904, "yolov12s.yaml": 9_127_424, "yolov12m.yaml": 19_670_784,
    "yolov12l.yaml": 26_506_496, "yolov12x.yaml": 59_414_176,
    "yolov12n-v1.yaml": 2_602_288, "yolov12s-v1.yaml": 9_284_096, "yolov12m-v1.yaml": 20_199_168,
    "yolov12l-v1.yaml": 26_450_784, "yolov12x-v1.yaml": 59_210_784,
}


@pytest.mark.parametrize("cfg", MODEL_CONFIGS)
def test_parameter_count_matches_published(cfg: str) -> None:
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[cfg]
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    assert model.spec.variant == ("v1" if "-v1" in cfg else "turbo")
    assert model.spec.scale == cfg[7]


@pytest.mark.parametrize("cfg", ["yolov12n.yaml", "yolov12n-v1.yaml"])
def test_eval_output_layout_any_stride_multiple(cfg: str) -> None:
    model = build_model(cfg, nc=3).eval()
    for h, w in [(320, 320), (192, 320), (256, 448)]:
        with torch.no_grad():
            y = model(torch.rand(2, 3, h, w))
        n = sum((h // s) * (w // s) for s in (8, 16, 32))
        assert y.shape == (2, 4 + 3, n)
        xywh, scores = y[:, :4], y[:, 4:]
        assert (scores >= 0).all() and (scores <= 1).all()
        assert xywh[:, 0].max() <= w * 1.5 and xywh[:, 2].min() >= 0  # centres near the image, sizes positive


@pytest.mark.parametrize("cfg", ["yolov12n.yaml", "yolov12n-v1.yaml"])
def test_backward_reaches_every_parameter(cfg: str) -> None:
    model = build_model(cfg, nc=2).train()
    out = model(torch.rand(2, 3, 128, 128))
    sum(o.float().pow(2).mean() for o in out).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name


def test_dfl_is_the_expected_bin_of_each_box_side() -> None:
    """DFL: per box side, softmax over its 16 bins, then sum_i p_i * i (what the loss trains; the bins-last
    layout is an export speed-up and must not change a number)."""
    x = torch.randn(2, 4 * 16, 50) * 3
    expected = (x.view(2, 4, 16, 50).softmax(2) * torch.arange(16.0).view(1, 1, 16, 1)).sum(2)
    assert torch.allclose(DFL(16)(x), expected, atol=1e-5)
    assert set(DFL(16).state_dict()) == {"conv.weight"}  # ultralytics checkpoints carry it


def test_nc_override_and_names() -> None:
    model = build_model("yolov12s.yaml", names=["scratch", "dent", "crack"])
    assert model.nc == 3 and model.names == {0: "scratch", 1: "dent", 2: "crack"}
    assert model.head.cv3[0][-1].out_channels == 3
    with pytest.raises(ValueError, match="class names"):
        build_model("yolov12n.yaml", nc=4, names=["a"])
    for bad in (0, "3", 2.5):  # 0 failed deep in torch's conv2d; "3" was taken
        with pytest.raises(ValueError, match="nc must be a whole number of classes >= 1"):
            build_model("yolov12n.yaml", nc=bad)
    with pytest.raises(FileNotFoundError, match=r"yolov12n\.yaml"):
        build_model("yolov13q.yaml")


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("area", [1, 4])
def test_turbo_area_attention_equals_explicit_softmax(area: int) -> None:
    """The turbo module's output, recomputed by hand: stripes of tokens, head-major channels, softmax."""
    torch.manual_seed(0)
    attn = AAttn(64, num_heads=2, area=area).eval()
    x = torch.randn(2, 64, 8, 6)
    b, c, h, w = x.shape
    with torch.no_grad():
        qk = attn.qk(x).flatten(2).transpose(1, 2)  # [B, N, 2C]
        v_map = attn.v(x)
        v = v_map.flatten(2).transpose(1, 2)
        n = h * w
        qk = qk.reshape(b * area, n // area, 2 * c)
        v = v.reshape(b * area, n // area, c)
        q, k = qk[..., :c], qk[..., c:]
        split = lambda t: t.reshape(t.shape[0], t.shape[1], 2, 32).permute(0, 2, 1, 3)  # noqa: E731
        out = _explicit_attention(split(q), split(k), split(v))  # [B*area, heads, N/area, 32]
        out = out.permute(0, 2, 1, 3).reshape(b, n, c).transpose(1, 2).reshape(b, c, h, w)
        expected = attn.proj(out + attn.pe(v_map))
        torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_v1_area_attention_equals_explicit_softmax() -> None:
    torch.manual_seed(0)
    attn = AAttnV1(64, num_heads=2, area=4).eval()
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        qkv = attn.qkv(x).flatten(2).transpose(1, 2).reshape(4, 16, 192)  # per head [q | k | v] of 32 each
        heads = qkv.reshape(4, 16, 2, 96).permute(0, 2, 1, 3)
        q, k, v = heads[..., :32], heads[..., 32:64], heads[..., 64:]
        out = _explicit_attention(q, k, v).permute(0, 2, 1, 3).reshape(1, 64, 64).transpose(1, 2).reshape(1, 64, 8, 8)
        v_map = v.permute(0, 2, 1, 3).reshape(1, 64, 64).transpose(1, 2).reshape(1, 64, 8, 8)
        torch.testing.assert_close(attn(x), attn.proj(out + attn.pe(v_map)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", ["yolov12n.yaml", "yolov12s-v1.yaml"])
def test_fuse_preserves_outputs(cfg: str) -> None:
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    for m in model.modules():  # non-trivial BN statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        before = model(x)
        after = model.fuse()(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    rel = (before - after).abs().max() / before.abs().max()
    assert rel <= 1e-4


def test_gradient_checkpointing_same_gradients_and_bn_stats() -> None:
    torch.manual_seed(0)
    model = build_model("yolov12n.yaml", nc=3)
    x = torch.rand(2, 3, 128, 128)
    grads, stats = [], []
    for ckpt in (False, True):
        m = build_model("yolov12n.yaml", nc=3)
        m.load_state_dict(model.state_dict())
        m.train().set_grad_checkpointing(ckpt)
        sum(o.pow(2).mean() for o in m(x)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
        stats.append(torch.cat([b.flatten().float() for n, b in m.named_buffers() if "running" in n]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats[0], stats[1])  # the recompute does not update BN stats twice


def test_yolo_api_info_counts_flops() -> None:
    info = YOLO("yolov12n.yaml").info(imgsz=320, verbose=False)
    assert info["parameters"] == PUBLISHED["yolov12n.yaml"]
    assert 1.0 < info["gflops"] < 3.0  # about a quarter of the 640 figure
    with pytest.raises(ValueError, match="expected a model yaml"):
        YOLO("model.txt")
