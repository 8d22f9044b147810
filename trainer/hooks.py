"""Training hooks: everything around the loop that is not data -> loss -> step (detectron2's shape).

Each hook sees the trainer and may act before/after training, each epoch and each step.
Order matters only where noted in `default_hooks`.
"""

from __future__ import annotations

import csv
import io
import os
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .optim import warmup

if TYPE_CHECKING:
    from .engine import Trainer

__all__ = [
    "CheckpointHook", "CloseMosaicHook", "EMAHook", "EarlyStopHook", "HookBase", "LRScheduleHook", "PlotsHook",
    "ProgressHook", "ResultsCSVHook", "StopTraining", "ValidationHook", "default_hooks",
]


class StopTraining(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a hook to end training cleanly after the current epoch's bookkeeping."""


class HookBase:
    """A no-op hook; subclasses override what they need. `trainer` is set when registered."""

    trainer: Trainer

    def before_train(self) -> None: ...
    def after_train(self) -> None: ...
    def before_epoch(self) -> None: ...
    def after_epoch(self) -> None: ...
    def before_step(self) -> None: ...
    def after_step(self) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class LRScheduleHook(HookBase):
    """Warmup per iteration for the first epochs (learning rate, momentum, and the batches accumulated per step
    ramped from 1 to the nominal batch's, as ultralytics), then the epoch schedule (linear or cosine)."""

    def before_train(self) -> None:
        t = self.trainer
        self.warmup_iters = max(round(t.cfg.warmup_epochs * t.iters_per_epoch), 100) if t.cfg.warmup_epochs > 0 else -1

    def before_step(self) -> None:
        t = self.trainer
        if t.iter <= self.warmup_iters:
            warmup(t.optimizer, t.iter, self.warmup_iters, t.lr_factor(t.epoch), t.cfg.warmup_bias_lr,
                   t.cfg.warmup_momentum, t.momentum)
            t.accumulate = max(1, round(float(np.interp(t.iter, [0, self.warmup_iters], [1, t.nominal_accumulate]))))

    def after_epoch(self) -> None:
        self.trainer.scheduler.step()


class EMAHook(HookBase):
    """Blend the weights into the EMA after every optimizer step."""

    def after_step(self) -> None:
        t = self.trainer
        if t.ema is not None and t.last_step.get("stepped", True):
            t.ema.update(t.model)


class CloseMosaicHook(HookBase):
    """Turn mosaic, mixup and copy-paste off for the last `close_mosaic` epochs (as the recipe does)."""

    def before_epoch(self) -> None:
        t = self.trainer
        if t.cfg.close_mosaic and t.epoch >= t.cfg.epochs - t.cfg.close_mosaic and not getattr(self, "done", False):
            t.train_set.close_mosaic()
            self.done = True
            left = t.cfg.epochs - t.epoch
            t.log(f"closing mosaic for the last {left} epoch{'s' if left != 1 else ''}")


class ValidationHook(HookBase):
    """Validate the EMA model on the main process after each epoch; others wait at a barrier.

    Each forward holds at most the training micro-batch (inference keeps no activations for a backward, so it
    needs less than the training step that fits); the validator halves it further on out of memory. If validation
    fails anyway, last.pt of the trained epoch is saved before the error ends the run, so the epoch is not lost.
    """

    def after_epoch(self) -> None:
        t = self.trainer
        final = t.epoch + 1 == t.cfg.epochs
        if t.ctx.is_main and t.validator is not None and (t.cfg.val or final):
            t.validator.chunk = min(t.validator.chunk or t.micro_batch, t.micro_batch)
            try:
                m = t.validator(t.eval_model())
            except Exception:
                self._save_trained_epoch(final)
                raise
            t.metrics = m
            t.fitness = 0.1 * m["mAP50"] + 0.9 * m["mAP50-95"]
            t.log(f"epoch {t.epoch + 1}: mAP50-95 {m['mAP50-95']:.4f}  mAP50 {m['mAP50']:.4f}  "
                  f"P {m.get('precision', 0):.3f}  R {m.get('recall', 0):.3f}")

    def _save_trained_epoch(self, final: bool) -> None:
        """last.pt as CheckpointHook would save it (without this epoch's metrics), before a validation error ends the
        run; a save that fails too is reported, and the validation error is the one raised."""
        t = self.trainer
        last = t.save_dir / "weights" / "last.pt"
        try:
            t.save(last)
        except Exception as e:
            print(f"validation of epoch {t.epoch + 1} failed, and saving {last} too: {e}", file=sys.stderr, flush=True)
            return
        then = "validate it with yolov12-val" if final else "resume with --resume"
        print(f"validation of epoch {t.epoch + 1} failed; the epoch's weights are saved in {last} ({then})",
              file=sys.stderr, flush=True)


class ResultsCSVHook(HookBase):
    """Append one row per epoch to results.csv: losses, metrics, the learning rates the epoch ran with, speed."""

    def before_train(self) -> None:
        t = self.trainer
        path = t.save_dir / "results.csv"
        if not t.ctx.is_main:
            return
        if not t.cfg.resume:  # a new run (--exist-ok reusing a folder too) starts a new file
            path.unlink(missing_ok=True)
        elif path.exists():  # rows of epochs last.pt does not hold (a stop between the row and the save) go
            lines = path.read_text().splitlines(keepends=True)
            kept = lines[:1] + [ln for ln in lines[1:] if ln.split(",", 1)[0].isdigit()
                                and int(ln.split(",", 1)[0]) <= getattr(t, "start_epoch", 0)]
            if len(kept) != len(lines):
                path.write_text("".join(kept))

    def after_step(self) -> None:
        # read here: by the time after_epoch runs, LRScheduleHook has already moved to the next epoch's rates
        self.lrs = [g["lr"] for g in self.trainer.optimizer.param_groups]

    def after_epoch(self) -> None:
        t = self.trainer
        if not t.ctx.is_main:
            return
        lrs = getattr(self, "lrs", None) or [g["lr"] for g in t.optimizer.param_groups]
        row = {"epoch": t.epoch + 1, **{f"train/{k}_loss": round(v, 5) for k, v in t.epoch_losses.items()},
               **{f"metrics/{k}": round(float(t.metrics[k]), 5) for k in ("precision", "recall", "mAP50", "mAP50-95")
                  if k in t.metrics},
               **{f"lr/pg{i}": lr for i, lr in enumerate(lrs)},
               "images_per_s": round(t.epoch_images_per_s, 2), "time_s": round(time.monotonic() - t.start_time, 1)}
        path = t.save_dir / "results.csv"
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(row))
        if not path.exists() or path.stat().st_size == 0:  # empty: a first row the disk refused (cut back to 0)
            writer.writeheader()
        writer.writerow(row)
        _append_whole(path, text.getvalue().encode())


def _append_whole(path: Path, data: bytes) -> None:
    """Append `data` to `path` whole or not at all: a write the disk refuses (full) is cut back off, so no partial
    row is left for the next one to run into."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


class CheckpointHook(HookBase):
    """Save last.pt every epoch, best.pt when the fitness improves (main process only, atomically)."""

    def before_train(self) -> None:
        t = self.trainer
        if t.ctx.is_main and not t.cfg.resume:  # --exist-ok reusing a folder: the last run's best is not this one's
            (t.save_dir / "weights" / "best.pt").unlink(missing_ok=True)

    def after_epoch(self) -> None:
        t = self.trainer
        if not t.ctx.is_main:
            return
        weights = t.save_dir / "weights"
        t.save(weights / "last.pt")
        if t.fitness is not None and (t.best_fitness is None or t.fitness >= t.best_fitness):
            t.best_fitness = t.fitness
            t.save(weights / "best.pt")
        if t.cfg.save_period > 0 and (t.epoch + 1) % t.cfg.save_period == 0:
            t.save(weights / f"epoch{t.epoch + 1}.pt")

    def after_train(self) -> None:
        t = self.trainer
        best = t.save_dir / "weights" / "best.pt"
        # no validation ran (--val False): the last weights are the best we know; not after a failure, whose
        # unvalidated weights would pass for validated ones (last.pt has them, to resume)
        if t.ctx.is_main and t.finished and not best.exists() and (t.save_dir / "weights" / "last.pt").exists():
            t.save(best)


class EarlyStopHook(HookBase):
    """Stop when the fitness has not improved for `patience` epochs (0: never; decided on the main process,
    shared)."""

    def after_epoch(self) -> None:
        t = self.trainer
        stop = 0
        if t.ctx.is_main and t.fitness is not None:
            if t.best_fitness is None or t.fitness >= t.best_fitness:
                t.best_epoch = t.epoch
            stop = int(t.cfg.patience > 0 and t.epoch - t.best_epoch >= t.cfg.patience)  # 0: never
        if t.broadcast_flag(stop):
            t.log(f"stopping early: no improvement for {t.cfg.patience} epochs (best epoch {t.best_epoch + 1})")
            raise StopTraining


class ProgressHook(HookBase):
    """A progress bar on the main process: epoch, losses, images/s and peak memory."""

    bar: Any = None

    def before_epoch(self) -> None:
        t = self.trainer
        self.bar = None
        self.images, self.t0 = 0, time.perf_counter()
        if t.ctx.is_main and t.cfg.verbose:
            from tqdm import tqdm

            self.bar = tqdm(total=t.iters_per_epoch, desc=f"epoch {t.epoch + 1}/{t.cfg.epochs}", unit="batch",
                            dynamic_ncols=True, leave=True)

    def after_step(self) -> None:
        t = self.trainer
        self.images += t.last_step["images"] * t.ctx.world_size
        t.epoch_images_per_s = self.images / max(time.perf_counter() - self.t0, 1e-9)
        if self.bar is not None:
            losses = " ".join(f"{k} {v:.3f}" for k, v in t.epoch_losses.items())
            self.bar.set_postfix_str(f"{losses} | {t.epoch_images_per_s:.1f} img/s | {peak_memory_gb(t.device):.2f} GB")
            self.bar.update(1)

    def after_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def after_train(self) -> None:
        # a stop mid-epoch (SIGTERM, Ctrl-C, an error): close the bar now, or it redraws after the stop's last line
        self.after_epoch()


class PlotsHook(HookBase):
    """Loss / metric curves and the PR curve as PNGs once training ends."""

    def after_train(self) -> None:
        t = self.trainer
        if not (t.ctx.is_main and t.cfg.plots and (t.save_dir / "results.csv").exists()):
            return
        try:
            from .plots import plot_pr_curve, plot_results

            plot_results(t.save_dir / "results.csv", t.save_dir / "results.png")
            if t.metrics.get("pr_curve") is not None:
                plot_pr_curve(t.metrics, t.save_dir / "PR_curve.png")
        except Exception as e:  # a plot must never cost a finished training run
            t.log(f"plots skipped: {e}")


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def default_hooks() -> list[HookBase]:
    """The standard set, in order: LR before the step; EMA after it; validation before checkpoint and CSV."""
    return [LRScheduleHook(), CloseMosaicHook(), EMAHook(), ProgressHook(), ValidationHook(), ResultsCSVHook(),
            CheckpointHook(), EarlyStopHook(), PlotsHook()]


