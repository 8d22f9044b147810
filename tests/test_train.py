"""The distributed trainer on CPU: exact micro-batching, real 2-process DDP (gloo), exact resume, learning, CLI."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from trainer import YOLO
from trainer.config import TrainConfig
from trainer.distributed import DistContext, init_process, launch
from trainer.engine import Trainer
from trainer.hooks import HookBase, StopTraining
from trainer.nn import build_model

# No augmentation at all: every rank and every run sees the same pixels for the same image.
NO_AUGMENT = {"mosaic": 0.0, "mixup": 0.0, "copy_paste": 0.0, "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0,
              "fliplr": 0.0, "translate": 0.0, "scale": 0.0}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.data import synthesize

    return synthesize(tmp_path_factory.mktemp("tiny"), images=20, imgsz=96, val_fraction=0.2, seed=3)


def _cfg(data: Path, **kw) -> TrainConfig:
    base = {"data": str(data), "imgsz": 96, "batch": 8, "workers": 0, "epochs": 2, "optimizer": "SGD", "lr0": 0.01,
            "ema": False, "verbose": False, "plots": False, "warmup_epochs": 0.0, **NO_AUGMENT}
    base.update(kw)
    return TrainConfig.from_kwargs(**base)


def _grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_micro_batches_give_the_whole_batch_gradient(tiny_data: Path, tmp_path: Path) -> None:
    """Acceptance 1: k micro-batches accumulate to the gradient of one step on the whole batch (BN in eval)."""
    torch.manual_seed(0)
    trainer = Trainer(_cfg(tiny_data), build_model("yolov12n.yaml"), DistContext(), tmp_path)
    for m in trainer.model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    batch = next(iter(trainer.train_loader))
    grads = {}
    for micro in (8, 4, 3, 1):
        trainer.micro_batch = micro
        stats = trainer.accumulate_gradients(batch)
        assert stats is not None and stats["images"] == 8
        grads[micro] = _grads(trainer.model).clone()
        trainer.optimizer.zero_grad(set_to_none=True)
    for micro in (4, 3, 1):
        rel = (grads[micro] - grads[8]).norm() / grads[8].norm()
        assert rel < 1e-5, (micro, rel.item())


def _ddp_rank(cfg_dict: dict, init: str, save_dir: str, steps: int) -> None:
    """Runs in each launched process: `steps` optimizer steps, then this rank's weights to a file."""
    from trainer.checkpoint import load_checkpoint

    ctx = init_process(["cpu"], 120)
    trainer = Trainer(TrainConfig(**cfg_dict), load_checkpoint(init).model, ctx, Path(save_dir))
    loader = iter(trainer.train_loader)
    for _ in range(steps):
        trainer.run_step(next(loader))
    torch.save(trainer.model_without_ddp.state_dict(), Path(save_dir) / f"rank{ctx.rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_equal_one_process(tiny_data: Path, tmp_path: Path) -> None:
    """Acceptance 2: two real gloo ranks end with identical weights, equal to one process on the whole batch."""
    from trainer.checkpoint import save_checkpoint

    torch.manual_seed(0)
    init = save_checkpoint(tmp_path / "init.pt", build_model("yolov12n.yaml", names=["a", "b", "c", "d", "e"]))
    cfg = _cfg(tiny_data, sync_bn=True)
    launch(_ddp_rank, 2, cfg.to_dict(), str(init), str(tmp_path), 2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k

    single_cfg = _cfg(tiny_data, sync_bn=False)
    from trainer.checkpoint import load_checkpoint

    single = Trainer(single_cfg, load_checkpoint(init).model, DistContext(), tmp_path)
    loader = iter(single.train_loader)
    for _ in range(2):
        single.run_step(next(loader))
    ref = single.model_without_ddp.state_dict()
    start = torch.load(init)["model"]
    keys = [k for k in ref if ref[k].is_floating_point() and "running" not in k]
    moved_single = torch.cat([(ref[k] - start[k]).flatten() for k in keys])
    moved_ddp = torch.cat([(rank0[k] - start[k]).flatten() for k in keys])
    assert moved_single.norm() > 1e-3  # the steps did change the weights
    # equal up to float32 summation order (which SyncBatchNorm statistics amplify through depth: ~1e-4)
    assert (moved_ddp - moved_single).norm() / moved_single.norm() < 1e-2
    stats = [k for k in ref if "running_mean" in k]
    for k in stats:
        torch.testing.assert_close(rank0[k], ref[k], rtol=1e-3, atol=1e-4, msg=k)


class _StopAfter(HookBase):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def after_epoch(self) -> None:
        if self.trainer.epoch + 1 >= self.epochs:
            raise StopTraining


def test_resume_continues_exactly(tiny_data: Path, tmp_path: Path) -> None:
    """Acceptance 3: 2 epochs straight = 1 epoch, stop, resume for the second (deterministic mode, augmenting)."""
    kw = {"data": str(tiny_data), "imgsz": 96, "batch": 8, "workers": 0, "epochs": 2, "deterministic": True,
          "close_mosaic": 0, "verbose": False, "plots": False, "project": str(tmp_path), "exist_ok": True}
    torch.manual_seed(0)
    start = build_model("yolov12n.yaml")

    YOLO(build_model("yolov12n.yaml")).model.load_state_dict(start.state_dict())
    straight = YOLO(start)
    straight.source = "yolov12n.yaml"
    straight.train(name="straight", **kw)

    parted = YOLO(build_model("yolov12n.yaml"))
    parted.model.load_state_dict(start.state_dict())
    parted.train(name="parted", hooks=[_StopAfter(1)], **kw)
    first = torch.load(tmp_path / "parted" / "weights" / "last.pt", weights_only=True)
    assert first["epoch"] == 0
    YOLO(str(tmp_path / "parted" / "weights" / "last.pt")).train(resume=str(tmp_path / "parted" / "weights" /
                                                                             "last.pt"))

    a = torch.load(tmp_path / "straight" / "weights" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "parted" / "weights" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1 and a["iteration"] == b["iteration"]
    for key in ("train_model", "model"):
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], rtol=1e-5, atol=1e-6, msg=f"{key}:{k}")
    rows = (tmp_path / "parted" / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + one row per epoch, across the two runs


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    cases = [["--data", str(tmp_path / "missing.yaml"), "--epochs", "1"],
             ["--data", "x.yaml", "--imgsz", "100"],
             ["--data", "x.yaml", "--device", "7"]]
    for args in cases:
        out = subprocess.run([sys.executable, "-m", "trainer.cli", *args], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
        assert out.returncode == 2, out.stderr
        lines = [ln for ln in out.stderr.strip().splitlines() if ln]
        assert len(lines) == 1 and lines[0].startswith("yolov12-train: error:"), out.stderr


DEMO_CKPT = Path(__file__).resolve().parent / "assets" / "yolov12n-defects.pt"


def test_learns_synthetic_defects(tmp_path: Path) -> None:
    """Acceptance 5, sized for CI: the demo model with blank class-prediction layers learns to classify again.

    Training yolov12n from scratch needs thousands of iterations before mAP moves (measured here: mAP50
    0.001 after 8 epochs of 240 images), far beyond a CI budget. So the network comes from the bundled
    demo checkpoint and the last 1x1 convolution of every class branch is blanked (zero weights, the prior
    bias): every score sits below the 0.001 confidence floor, mAP50 is 0, and two short epochs (24 steps)
    must lift it clearly (measured: 0.27). The bias warm-up of ultralytics' recipe (0.1; the official
    YOLOv12 recipe uses 0.0) lets the class biases leave the prior within those steps. A broken loss,
    assigner, optimizer or gradient normalisation keeps mAP50 near 0 (without the warm-up it stays at 0.02).
    """
    from trainer.checkpoint import load_checkpoint
    from trainer.data import synthesize

    data = synthesize(tmp_path / "data", images=120, imgsz=320, val_fraction=0.25, seed=11)
    model = load_checkpoint(DEMO_CKPT).model
    for branch, stride in zip(model.head.cv3, model.head.stride.tolist()):  # per level, the last is the logit conv
        assert isinstance(branch[-1], nn.Conv2d) and branch[-1].out_channels == model.head.nc
        nn.init.zeros_(branch[-1].weight)
        nn.init.constant_(branch[-1].bias, math.log(5 / model.head.nc / (640 / stride) ** 2))  # Detect.bias_init
    yolo = YOLO(model)
    before = yolo.val(data=str(data), imgsz=320, batch=16, verbose=False)["mAP50"]
    metrics = yolo.train(data=str(data), epochs=2, imgsz=320, batch=8, workers=0, optimizer="AdamW", lr0=0.002,
                         warmup_bias_lr=0.1, close_mosaic=1, project=str(tmp_path), name="learn", plots=False,
                         verbose=False)
    assert before < 0.01
    assert metrics["mAP50"] > max(0.15, before + 0.15), (before, metrics)
