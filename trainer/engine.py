"""The distributed trainer: a loop of steps with hooks (detectron2's shape), and the `train()` entry point.

One optimizer step is one step on all its images, however they are split: a step holds one global
batch, or several accumulated up to the nominal batch (--nbs) below it; each is divided across
processes, then into micro-batches; gradients of every micro-batch, rank and batch are summed and
normalised once by the step's target-score sum (see `DetectionLoss`), so the update equals the one a
single device holding all of the step's images would make. There is no DDP wrapper: each rank runs
all its micro-batches inside the out-of-memory guard, then every rank enters the same collectives at
each batch's end (the failure flag) and at the step's end (gradients and BatchNorm statistics). An
out-of-memory error on any rank makes every rank discard the step, halve the micro-batch and replay it.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import FORMAT, CheckpointError, load_checkpoint, load_raw, save_checkpoint
from .config import AUTO_RESUME, TrainConfig
from .distributed import (
    DistContext,
    all_reduce_tensors,
    barrier,
    broadcast_module,
    convert_sync_batchnorm,
    epoch_end_group,
    init_process,
    launch,
    launched_rank,
    parse_devices,
    under_launcher,
)
from .ema import ModelEMA
from .hooks import HookBase, StopTraining, default_hooks
from .lockstep import StepLedger
from .memory import MemoryPlan, autocast, choose_precision, is_oom, parse_bytes, plan_memory
from .nn import DetectionModel, build_model
from .optim import build_optimizer, lr_lambda

if TYPE_CHECKING:
    from .data import LabelReport

__all__ = ["Trainer", "train"]


class Trainer:
    """Owns the loop and the parts it wires together: data, model, loss, optimizer, EMA, hooks."""

    def __init__(self, cfg: TrainConfig, model: DetectionModel, ctx: DistContext, save_dir: Path,
                 hooks: list[HookBase] | None = None, resume: dict[str, Any] | None = None) -> None:
        """`resume`: the raw last.pt of the run this one continues (its memory plan and world size are compared with
        this run's before the plan is logged); `resume_from` then restores the training state."""
        from .data import DataError, DetectionDataset, build_dataloader, load_data_config
        from .loss import DetectionLoss

        self.cfg, self.ctx, self.device, self.save_dir = cfg, ctx, ctx.device, save_dir
        _seed_everything(cfg.seed + ctx.rank, cfg.deterministic)
        self.data = load_data_config(cfg.data)
        model = adapt_to_names(model, self.data.names)
        cfg.augment_defaults(model.spec.scale)

        # data: the global batch split evenly across processes
        if cfg.batch % ctx.world_size:
            fix = f"resume on a number of processes that divides {cfg.batch}" if cfg.resume else "use a multiple"
            raise ValueError(f"batch {cfg.batch} does not split evenly over {ctx.world_size} processes: {fix}")
        self.per_process = cfg.batch // ctx.world_size
        self.train_set = DetectionDataset(self.data, "train", imgsz=cfg.imgsz, augment=True, hyp=cfg.to_dict(),
                                          cache=cfg.cache, rect=cfg.rect, pad=0.0,  # no extra stride: as ultralytics
                                          batch_size=cfg.batch if cfg.rect else self.per_process, seed=cfg.seed,
                                          workers=max(cfg.workers, 1), verbose=False)
        self.show_report(self.train_set.report)
        self._agree_on_start(int(resume["epoch"]) + 1 if resume is not None else 0)
        if not self.train_set.report.boxes_used:  # every rank sees the same scan, so every rank stops here
            raise DataError(self.train_set.report.no_boxes_message())
        self.train_loader = build_dataloader(self.train_set, self.per_process, cfg.workers, shuffle=True,
                                             rank=ctx.rank, world_size=ctx.world_size, seed=cfg.seed,
                                             rect_batches=cfg.rect)
        self.iters_per_epoch = len(self.train_loader)
        self.validator = None
        if ctx.is_main and (cfg.val or cfg.epochs):
            from .validate import VAL_BATCH, Validator

            # rect batches of a fixed size (yolov12-val's): the padded shapes, so the mAP, are those of yolov12-val
            # whatever --batch and the number of processes; the forward chunk follows the memory plan (below)
            val_set = DetectionDataset(self.data, "val", imgsz=cfg.imgsz, augment=False, cache=cfg.cache, rect=True,
                                       batch_size=VAL_BATCH, seed=cfg.seed, workers=max(cfg.workers, 1),
                                       verbose=False)
            self.show_report(val_set.report)
            val_loader = build_dataloader(val_set, VAL_BATCH, cfg.workers, shuffle=False, rank=0, world_size=1,
                                          seed=cfg.seed)
            self.validator = Validator(val_loader, self.data.names, self.device, progress=cfg.verbose)

        # model, precision, memory plan
        model = model.to(self.device).train()
        if cfg.sync_bn and ctx.distributed:
            model = convert_sync_batchnorm(model)
        if ctx.distributed:
            broadcast_module(model)  # every rank starts from rank 0's weights, whatever built them
        self.model = model
        self.dtype = choose_precision(cfg.amp, self.device)
        self.loss_fn = DetectionLoss(model, box=cfg.box, cls=cfg.cls, dfl=cfg.dfl)
        self.ledger = StepLedger(self.device)
        self.epoch_end_group = epoch_end_group(ctx, cfg.dist_timeout)  # waits out the main process's validation
        self.plan = self.plan_memory()
        if resume is not None:
            self.plan = self._plan_on_resume(self.plan, resume)
        self.micro_batch = self.plan.micro_batch
        if self.validator is not None:
            self.validator.chunk = self.micro_batch
        self.log(f"memory plan: {self.plan.describe(self.per_process)}; global batch {cfg.batch} over "
                 f"{ctx.world_size} process(es)")
        before = int((resume or {}).get("world_size") or 0)
        if before and before != ctx.world_size:
            self.log(f"resumed on {ctx.world_size} process(es) instead of {before}: the global batch {cfg.batch} is "
                     f"kept, {self.per_process} images per process instead of {cfg.batch // before}")

        # optimisation
        # below the nominal batch, loader batches are accumulated up to --nbs images per optimizer step (ultralytics')
        self.nominal_accumulate = max(round(cfg.nbs / cfg.batch), 1)
        self.accumulate = self.nominal_accumulate  # ramped up from 1 during warmup (LRScheduleHook)
        iterations = math.ceil(len(self.train_set) / max(cfg.batch, cfg.nbs)) * cfg.epochs
        decay = cfg.weight_decay * cfg.batch * self.nominal_accumulate / cfg.nbs
        self.optimizer, self.optimizer_name, lr0 = build_optimizer(model, cfg.optimizer, cfg.lr0, cfg.momentum, decay,
                                                                   iterations, model.nc)
        self.momentum = cfg.momentum if cfg.optimizer != "auto" else 0.9
        self.lr_factor = lr_lambda(cfg.epochs, cfg.lrf, cfg.cos_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.ema = ModelEMA(model, cfg.ema_decay, cfg.ema_tau) if cfg.ema else None
        accumulated = (f"; {self.nominal_accumulate} batches of {cfg.batch} per step (--nbs {cfg.nbs})"
                       if self.nominal_accumulate > 1 else "")
        per_epoch = math.ceil(len(self.train_set) / cfg.batch)
        if self.nominal_accumulate > 1 and per_epoch < self.nominal_accumulate:  # a small dataset: say what happens
            accumulated += (f", but an epoch holds {per_epoch}: one step per epoch, at its end (lower --nbs for "
                            "more)")
        self.log(f"optimizer {self.optimizer_name} lr0={lr0:g} momentum={self.momentum} weight_decay={decay:g}"
                 f"{accumulated}")

        # loop state
        self.start_epoch, self.epoch, self.iter = 0, 0, 0
        self.metrics: dict[str, Any] = {}
        self.fitness: float | None = None
        self.best_fitness: float | None = None
        self.best_epoch = 0
        self.epoch_losses: dict[str, float] = {}
        self.epoch_images_per_s = 0.0
        self.last_step: dict[str, Any] = {}
        self.step_batches: list[dict[str, Any]] = []  # the loader batches of the optimizer step under way
        self.finished = False  # the loop ran to its end (or an early stop), not ended by an error
        self.start_time = time.monotonic()  # for durations: a wall-clock step (NTP) would jump results.csv time_s
        self.hooks: list[HookBase] = []
        self.register_hooks(default_hooks() + list(hooks or []))

    def _agree_on_start(self, start_epoch: int) -> None:
        """Every rank reads the train split, and a resumed run's last.pt, from its own node's disk: the split's class
        names, images (relative to the dataset's root) and labels, and the epoch training starts at, must be the
        same everywhere, or the ranks would run different numbers of steps and wait on each other until
        --dist-timeout. A difference stops every rank with one line."""
        if not self.ctx.distributed:
            return
        import hashlib

        from .data import DataError

        digest = hashlib.blake2b(repr(sorted(self.data.names.items())).encode(), digest_size=7)
        records = self.train_set.records
        for rec in sorted(records, key=lambda r: r.im_file):
            path = Path(rec.im_file)
            digest.update(str(path.relative_to(self.data.root) if path.is_relative_to(self.data.root) else path.name)
                          .encode())
            digest.update(np.ascontiguousarray(rec.cls, dtype=np.int64).tobytes())
            digest.update(np.ascontiguousarray(rec.boxes, dtype=np.float32).tobytes())
        boxes = sum(len(r.cls) for r in records)
        mine = torch.tensor([len(records), boxes, int.from_bytes(digest.digest(), "big"), start_epoch],
                            device=self._comm_device)
        every = [torch.zeros_like(mine) for _ in range(self.ctx.world_size)]
        dist.all_gather(every, mine)
        if any(not torch.equal(t[:3], every[0][:3]) for t in every):
            seen = "; ".join(f"rank {r}: {int(t[0])} images, {int(t[1])} boxes" for r, t in enumerate(every))
            raise DataError(f"the train split differs between the processes ({seen}; or other files, labels or "
                            f"class names): every node needs the same dataset at the same path ({self.cfg.data})")
        if any(int(t[3]) != start_epoch for t in every):
            seen = "; ".join(f"rank {r}: epoch {int(t[3]) + 1}" for r, t in enumerate(every))
            raise ValueError(f"the processes would start at different epochs ({seen}): a resume reads the run's "
                             "last.pt on every node, so the project folder (--project) must be on a file system "
                             "every node mounts")

    # ------------------------------------------------------------------ hooks and the loop
    def register_hooks(self, hooks: list[HookBase]) -> None:
        for h in hooks:
            h.trainer = self
            self.hooks.append(h)

    def _call(self, stage: str) -> None:
        for h in self.hooks:
            getattr(h, stage)()

    def train(self) -> dict[str, Any]:
        """Run from `start_epoch` to `cfg.epochs`; returns the last validation metrics."""
        try:
            self._call("before_train")
            for epoch in range(self.start_epoch, self.cfg.epochs):
                self.epoch = epoch
                self._set_epoch(epoch)
                self._call("before_epoch")
                self.epoch_losses, sums, weights = {}, torch.zeros(3, dtype=torch.float64), 0.0
                for batch, last in _with_last(self.train_loader):
                    self._call("before_step")
                    self.last_step = self.run_step(batch, ends_epoch=last)
                    sums += self.last_step["loss_sums"]
                    weights += self.last_step["weight"]
                    self.epoch_losses = dict(zip(("box", "cls", "dfl"), (sums / max(weights, 1e-12)).tolist()))
                    self.iter += 1
                    self._call("after_step")
                try:
                    self._call("after_epoch")
                except StopTraining:
                    break
            self.finished = True
        finally:
            self._call("after_train")
        # only on the normal path (a failing rank must not wait for the others), for the main process's last saves
        barrier(self.ctx, self.epoch_end_group)
        return self.metrics

    def _set_epoch(self, epoch: int) -> None:
        for obj in (self.train_set, getattr(self.train_loader, "sampler", None),
                    getattr(getattr(self.train_loader, "batch_sampler", None), "sampler", None)):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)

    # ------------------------------------------------------------------ memory
    def plan_memory(self) -> MemoryPlan:
        """Micro-batch and checkpointing for this device, then agreed by every rank (the smallest micro-batch,
        checkpointing if any rank needs it): ranks that accumulated differently would step differently.

        Probing runs real forward and backward passes; the model's BatchNorm statistics are put back
        afterwards, and cross-rank BatchNorm stays local meanwhile (ranks probe independently).
        """
        cfg = self.cfg
        budget = parse_bytes(cfg.memory_budget) if cfg.memory_budget else 0
        with self.ledger.local(), self._buffers_kept():
            plan = plan_memory(self.per_process, self.device, self.dtype, cfg.micro_batch, cfg.grad_checkpointing,
                               self._probe, budget)
        if self.ctx.distributed:
            mine = torch.tensor([-plan.micro_batch, int(plan.grad_checkpointing)], device=self._comm_device)
            dist.all_reduce(mine, op=dist.ReduceOp.MAX)
            plan = replace(plan, micro_batch=-int(mine[0]), grad_checkpointing=bool(mine[1]))
        self.model.set_grad_checkpointing(plan.grad_checkpointing)
        if self.ctx.distributed and cfg.sync_bn:
            with self._buffers_kept():  # the in-step collectives of one micro-batch, for a rank that fails mid-step
                self.ledger.record(lambda: self._probe(1, plan.grad_checkpointing))
        return plan

    def _probe(self, n: int, checkpointing: bool) -> None:
        """One forward + backward of n synthetic images at the training size (for the memory probe)."""
        self.model.set_grad_checkpointing(checkpointing)
        s = self.cfg.imgsz
        batch = {"img": torch.randint(0, 255, (n, 3, s, s), dtype=torch.uint8),
                 "batch_idx": torch.arange(n, dtype=torch.float32).repeat_interleave(4),
                 "cls": torch.zeros(n * 4, 1), "bboxes": torch.rand(n * 4, 4) * 0.4 + 0.3}
        try:
            self._forward_loss(batch).total.backward()
        finally:
            self.model.zero_grad(set_to_none=True)

    def _plan_on_resume(self, plan: MemoryPlan, raw: dict[str, Any]) -> MemoryPlan:
        """The plan a resumed run uses: the interrupted run's micro-batch when smaller (it was halved after an
        out-of-memory error) and it ran on the same kind of device with the same per-process batch and memory
        options; otherwise this run's own plan. Agreed by every rank, as `plan_memory`."""
        saved = raw.get("train_args") or {}
        same = (raw.get("device_kind") == device_kind(self.device) and raw.get("world_size") == self.ctx.world_size
                and all(saved.get(k) == getattr(self.cfg, k)
                        for k in ("batch", "micro_batch", "memory_budget", "grad_checkpointing", "amp")))
        micro = int(raw.get("micro_batch") or 0) if same else 0
        if self.ctx.distributed:  # kept only where every rank would keep it
            agreed = torch.tensor([-micro], device=self._comm_device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            micro = -int(agreed[0])
        if 0 < micro < plan.micro_batch:
            return replace(plan, micro_batch=micro, probed=False, resumed=True)
        return plan

    @contextlib.contextmanager
    def _buffers_kept(self):
        """Put the model's buffers (BatchNorm statistics) back as they were when the block ends."""
        saved = [b.detach().clone() for b in self.model.buffers()]
        try:
            yield
        finally:
            with torch.no_grad():
                for b, v in zip(self.model.buffers(), saved):
                    b.copy_(v)

    # ------------------------------------------------------------------ one optimizer step
    def run_step(self, batch: dict[str, Any], ends_epoch: bool = False) -> dict[str, Any]:
        """data -> loss -> backward over micro-batches; the optimizer steps once the step holds `accumulate`
        loader batches (`--nbs` images, as ultralytics) or the epoch ends. Returns the batch's statistics.

        Out of memory on any rank: every rank discards the step's gradients, halves the micro-batch and replays
        the step's batches (kept until it is taken, at most --nbs images).
        """
        if not self.step_batches:
            self.begin_step(batch)
        self.step_batches.append(batch)
        stats = self.accumulate_gradients(batch)
        while stats is None:
            if self.micro_batch == 1:
                raise torch.cuda.OutOfMemoryError("out of memory even at micro-batch 1: lower --imgsz or use "
                                                  "--grad-checkpointing on")
            self.micro_batch = max(1, self.micro_batch // 2)
            self.log(f"out of memory on a rank: every rank retries the step with micro-batch {self.micro_batch}")
            stats = self._replay_step()
        stats["stepped"] = False
        if ends_epoch or len(self.step_batches) >= self.accumulate:
            self.reduce_gradients()
            stats["stepped"] = self.optimizer_step()
            self.step_batches = []
        return stats

    def begin_step(self, batch: dict[str, Any]) -> None:
        """Open an optimizer step whose first batch is `batch`: no gradients, no batches, zero sums, the BatchNorm
        statistics a replay returns to, the step's loss scale."""
        self.step_batches = []
        self.optimizer.zero_grad(set_to_none=True)
        self.step_buffers = [b.detach().clone() for b in self.model.buffers()]
        self.step_sums = {"norm": 0.0, "images": 0.0}
        # constant within the step, so the final rescale is exact; keeps a chunk's summed loss near 1 for fp16
        self.loss_scale = 1.0 / min(self.micro_batch, batch["img"].shape[0])

    def _replay_step(self) -> dict[str, Any] | None:
        """Undo the step (on every rank alike) and run its batches again; the last one's statistics, or None."""
        with torch.no_grad():
            for buf, saved in zip(self.model.buffers(), self.step_buffers):
                buf.copy_(saved)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        batches = self.step_batches
        self.begin_step(batches[0])
        for b in batches:
            self.step_batches.append(b)
            if (stats := self.accumulate_gradients(b)) is None:
                self.step_batches = batches
                return None
        return stats

    def accumulate_gradients(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        """Add one loader batch's un-normalised loss gradient to `.grad`; None when any rank ran out of memory
        (the step's gradients and BatchNorm statistics are then partial: `run_step` replays the step).

        Each micro-batch's un-normalised loss is back-propagated with the step's constant scale, all inside the
        out-of-memory guard. At the batch's end every rank enters the same collective: the failure flag with
        the target-score, image and loss sums, so every rank knows at once whether to replay.
        """
        n = batch["img"].shape[0]
        chunks = [(i, min(i + self.micro_batch, n)) for i in range(0, n, self.micro_batch)]
        loss_sums, norm, failed = torch.zeros(3, dtype=torch.float64), 0.0, False
        with self.ledger.active():
            for k, (a, b) in enumerate(chunks):
                self.ledger.begin_micro_step()
                try:
                    out = self._forward_loss(_slice_batch(batch, a, b))
                    if not torch.isfinite(out.total):
                        raise FloatingPointError(f"non-finite loss at iteration {self.iter} (epoch {self.epoch + 1}): "
                                                 f"box/cls/dfl = {out.items.tolist()}")
                    self.scaler.scale(out.total * self.loss_scale).backward()
                except Exception as e:
                    if not is_oom(e):
                        raise
                    failed = True
                else:
                    norm += float(out.norm)
                    # items are per max(norm, 1): weighed back to sums
                    loss_sums += out.items.detach().cpu().double() * max(float(out.norm), 1.0)
                    continue
                self.ledger.enter_rest(len(chunks) - k - 1)  # outside `except`: the failed graph is freed
                break
        any_failed, global_norm, global_images, *global_sums = self._sum_over_ranks(
            [float(failed), norm, float(n), *loss_sums.tolist()])
        if any_failed:
            return None
        self.step_sums["norm"] += global_norm
        self.step_sums["images"] += global_images
        # the losses logged are the global batch's, normalised as its gradient is: the same numbers whatever the
        # split into processes and micro-batches (per micro-batch weights made them depend on it, up to 2x)
        return {"loss_sums": torch.tensor(global_sums, dtype=torch.float64), "norm": norm,
                "weight": max(global_norm, 1.0), "images": n}

    def reduce_gradients(self) -> None:
        """Leave in `.grad` the gradient of one step on every image of the step (all loader batches, ranks and
        micro-batches): gradients and BatchNorm statistics summed over ranks (the same collectives on every
        rank, in the same order), then rescaled once by the step's image count over its target-score sum."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.ctx.distributed:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            all_reduce_tensors([p.grad for p in params])
            all_reduce_tensors([b for b in self.model.buffers() if b.is_floating_point()], average=True)
        factor = self.step_sums["images"] / max(self.step_sums["norm"], 1.0) / self.loss_scale
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], factor)

    def optimizer_step(self) -> bool:
        """Unscale, clip, step, update the loss scaler, clear the gradients. False when fp16 overflow (in any
        batch of the step) skipped the step."""
        self.scaler.unscale_(self.optimizer)
        if self.cfg.clip_grad > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return not self.scaler.is_enabled() or self.scaler.get_scale() >= scale_before

    def _forward_loss(self, batch: dict[str, Any]):
        imgs = batch["img"].to(self.device, non_blocking=True).float() / 255
        with autocast(self.device, self.dtype):
            preds = self.model(imgs)
        return self.loss_fn([p.float() for p in preds], _to_device(batch, self.device))

    # ------------------------------------------------------------------ distributed helpers
    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        """Sums over ranks of a few numbers, in one collective (float64: exact for counts)."""
        if not self.ctx.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast_flag(self, value: int, op: str = "max") -> bool:
        """Agree on a flag across ranks (max of all); True when any rank raised it. Called at an epoch's end, where
        the others wait for the main process's validation and saving: on the patient epoch-end group."""
        if not self.ctx.distributed:
            return bool(value)
        t = torch.tensor([value], device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.epoch_end_group)
        return bool(t.item())

    # ------------------------------------------------------------------ saving, resuming, logging
    def eval_model(self) -> DetectionModel:
        return self.ema.ema if self.ema is not None else self.model

    def save(self, path: Path) -> None:
        """A checkpoint that resumes exactly: weights, EMA, optimizer, scaler, schedule position and RNG states."""
        save_checkpoint(
            path, self.eval_model(), imgsz=self.cfg.imgsz, epoch=self.epoch, iteration=self.iter,
            train_args=self.cfg.to_dict(), train_model={k: v.detach().cpu() for k, v in
                                                        self.model.state_dict().items()},
            ema=self.ema.state_dict() if self.ema else None, optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict(), scheduler=self.scheduler.state_dict(), micro_batch=self.micro_batch,
            world_size=self.ctx.world_size, device_kind=device_kind(self.device),
            best_fitness=self.best_fitness, best_epoch=self.best_epoch, metrics=_plain(self.metrics),
            rng=_rng_state(), hooks=[h.state_dict() for h in self.hooks])

    def resume_from(self, raw: dict[str, Any]) -> None:
        """Restore everything `save` wrote; training continues with the next epoch."""
        self.model.load_state_dict(raw["train_model"])
        if self.ema is not None and raw.get("ema"):
            self.ema.load_state_dict(raw["ema"])
        self.optimizer.load_state_dict(raw["optimizer"])
        self.scaler.load_state_dict(raw["scaler"])
        self.scheduler.load_state_dict(raw["scheduler"])
        self.start_epoch, self.iter = int(raw["epoch"]) + 1, int(raw["iteration"])
        self.best_fitness, self.best_epoch = raw.get("best_fitness"), int(raw.get("best_epoch") or 0)
        self.metrics = dict(raw.get("metrics") or {})
        for h, state in zip(self.hooks, raw.get("hooks") or []):
            h.load_state_dict(state)
        if self.start_epoch >= self.cfg.epochs - self.cfg.close_mosaic > 0:
            self.train_set.close_mosaic()
        _set_rng_state(raw["rng"], self.ctx.rank)
        self.log(f"resuming at epoch {self.start_epoch + 1} of {self.cfg.epochs}")

    def log(self, msg: str) -> None:
        if self.ctx.is_main and self.cfg.verbose:
            print(msg, flush=True)

    def show_report(self, report: LabelReport) -> None:
        """A split's scan summary (`train: N/M images used ...`) for the user, on the main process: on stderr even
        when not verbose if images were skipped, rows changed or label files are missing; else like `log`."""
        if not self.ctx.is_main:
            return
        if report.needs_attention:
            print(report.summary(), file=sys.stderr, flush=True)
        else:
            self.log(report.summary())


# ---------------------------------------------------------------------- helpers
def device_kind(device: torch.device) -> str:
    """'cpu', or the GPU's name and memory: a resumed run keeps its memory plan only on the same kind."""
    if device.type != "cuda":
        return device.type
    props = torch.cuda.get_device_properties(device)
    return f"{props.name} {props.total_memory // 2**20} MiB"


def _with_last(batches: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """(batch, whether it is the last) for each batch: one read ahead, so the end is known whatever len() says."""
    it = iter(batches)
    try:
        current = next(it)
    except StopIteration:
        return
    for following in it:
        yield current, False
        current = following
    yield current, True


def _slice_batch(batch: dict[str, Any], a: int, b: int) -> dict[str, Any]:
    """Images a..b of a batch, with their labels re-indexed from 0."""
    keep = (batch["batch_idx"] >= a) & (batch["batch_idx"] < b)
    out = {k: v[a:b] if isinstance(v, list | tuple) else v for k, v in batch.items()}
    out.update(img=batch["img"][a:b], batch_idx=batch["batch_idx"][keep] - a, cls=batch["cls"][keep],
               bboxes=batch["bboxes"][keep])
    return out


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and k != "img" else v
            for k, v in batch.items()}


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """Keep only what torch.load(weights_only=True) reads back: numbers, strings, nested dicts."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, int | float | str | bool):
            out[k] = v
        elif isinstance(v, np.floating | np.integer):
            out[k] = v.item()
        elif isinstance(v, dict):
            out[k] = _plain(v)
    return out


def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


def _rng_state() -> dict[str, Any]:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
             "numpy_gauss": [int(has_gauss), float(gauss)], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], rank: int) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def adapt_to_names(model: DetectionModel, names: dict[int, str]) -> DetectionModel:
    """The model for the data's classes: itself when they match, else a new head (other weights kept)."""
    if model.names == names:
        return model
    fresh = build_model(model.spec.yaml, names=names, variant=model.spec.variant)
    if model.nc == len(names):
        fresh.load_state_dict(model.state_dict())
        return fresh
    own = fresh.state_dict()
    own.update({k: v for k, v in model.state_dict().items() if k in own and own[k].shape == v.shape})
    fresh.load_state_dict(own)
    return fresh


# what a resumed run may run differently (where and how it runs, not what it computes); everything else is the saved
# run's, and giving another value is refused (`_resume_config`)
_RESUME_MAY_CHANGE = ("device", "nproc", "workers", "dist_timeout", "verbose", "plots", "memory_budget", "micro_batch",
                      "grad_checkpointing", "data")


def _initial_model(yolo: Any, names: dict[int, str], seed: int) -> DetectionModel:
    """The weights training starts from, made under `seed`: a model fresh from a yaml is built again seeded,
    and a head for other classes than the data's is replaced, also seeded (the same seed, the same start)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(yolo.cfg_yaml, names=names) if getattr(yolo, "cfg_yaml", None) else yolo.model
        return adapt_to_names(model, names)


def _unique_dir(project: str, name: str, exist_ok: bool) -> Path:
    path = Path(project) / name
    if exist_ok or not path.exists():
        return path
    i = 2
    while (Path(project) / f"{name}{i}").exists():
        i += 1
    return Path(project) / f"{name}{i}"


def _run(cfg_dict: dict[str, Any], save_dir: str, init_weights: str | DetectionModel,
         hooks: list[HookBase] | None = None) -> dict[str, Any]:
    """One process's training (also the entry point of each launched rank); `init_weights`: a checkpoint's path,
    or the model itself (rank 0 broadcasts its weights to every rank)."""
    cfg = TrainConfig(**cfg_dict)
    ctx = init_process(parse_devices(cfg.device), cfg.dist_timeout)
    try:
        resume_raw = load_raw(cfg.resume) if cfg.resume else None
        model = init_weights if isinstance(init_weights, nn.Module) else load_checkpoint(init_weights).model
        trainer = Trainer(cfg, model, ctx, Path(save_dir), hooks, resume=resume_raw)
        if resume_raw is not None:
            trainer.resume_from(resume_raw)
        metrics = trainer.train()
        return {k: v for k, v in _plain(metrics).items() if not isinstance(v, dict)}
    finally:
        if ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _launched(cfg_dict: dict[str, Any], save_dir: str, init_weights: str) -> dict[str, Any]:
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_run)(cfg_dict, save_dir, init_weights)


def _read_resumable(last: Path) -> dict[str, Any]:
    """The raw contents of a last.pt to resume from; a file that is no such checkpoint (text, a torn or foreign .pt)
    is one CheckpointError / ValueError line naming it, like `--model`'s, instead of torch.load's traceback."""
    import pickle

    not_ours = (f"{last} is not a resumable checkpoint of this trainer (or training already finished): pass the "
                "weights/last.pt of an unfinished run, or start a new run with --model")
    try:
        raw = load_raw(last)
    except pickle.UnpicklingError:  # asks to run code: never one of our runs
        raise ValueError(not_ours) from None
    except Exception as e:  # text, zip errors, truncated files
        reason = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{last}: unreadable checkpoint ({e.__class__.__name__}: {reason}); pass the "
                              "weights/last.pt of an unfinished run") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or "train_model" not in raw:
        raise ValueError(not_ours)
    return raw


def _resume_config(cfg: TrainConfig, kwargs: dict[str, Any]) -> tuple[TrainConfig, Path]:
    """The saved options of the run to resume (except `_RESUME_MAY_CHANGE`) and its folder; errors say what to do."""
    last = Path(cfg.resume) if isinstance(cfg.resume, str) else Path(cfg.project) / cfg.name / "weights" / "last.pt"
    if not last.is_file():
        raise FileNotFoundError(f"nothing to resume: {last} does not exist")
    raw = _read_resumable(last)
    saved = TrainConfig.from_kwargs(**raw["train_args"])  # plain types, also from runs that saved a Path
    if int(raw.get("epoch", -1)) + 1 >= saved.epochs:
        raise ValueError(f"nothing to resume: the run in {last.parent.parent} finished its {saved.epochs} "
                         f"epochs; to train on, start a new run from its weights (--model "
                         f"{last.parent / 'best.pt'} --epochs N)")
    given = {k: getattr(cfg, k) for k in kwargs if hasattr(cfg, k)}  # as `cfg` holds them: plain types (from_kwargs)
    _refuse_fixed_options(saved, given, last, by_path=isinstance(cfg.resume, str))
    changes = {k: given[k] for k in _RESUME_MAY_CHANGE if k in given and k != "data"}
    changes["data"] = _resume_data(saved.data, given.get("data"), last.parent.parent)
    return replace(saved, resume=str(last), **changes), last.parent.parent


def _as_flag(key: str, value: Any) -> str:
    """An option as the command line spells it: --epochs 8, --cos-lr, --no-val."""
    flag = key.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def _refuse_fixed_options(saved: TrainConfig, kwargs: dict[str, Any], last: Path, by_path: bool) -> None:
    """One ValueError line for options given with a resume that differ from the run's and that a resume cannot
    change (batch, epochs, imgsz, ...): applying them silently, or silently not, both surprise."""
    ignore = {*_RESUME_MAY_CHANGE, "resume", "exist_ok", *(() if by_path else ("project", "name"))}  # True: they locate
    fixed = [k for k, v in kwargs.items() if k not in ignore and v != getattr(saved, k, v)]
    if fixed:
        given = ", ".join(f"{_as_flag(k, kwargs[k])} (the run has {getattr(saved, k)})" for k in fixed)
        may = ", ".join(f"--{k.replace('_', '-')}" for k in _RESUME_MAY_CHANGE)
        raise ValueError(f"{given}: a resumed run keeps the options it started with (only {may} may change); resume "
                         f"without them, or start a new run from its weights: --model {last} with the options you want")


def _resume_data(saved: str, given: str | None, run: Path) -> str:
    """The data.yaml a resumed run reads: `--data` when given (the dataset moved), else the one the run saved."""
    if given:
        if Path(given).expanduser().is_file():
            return given
        state = "is still there" if Path(saved).expanduser().is_file() else "is gone too"
        raise FileNotFoundError(f"--data {given}: data.yaml not found (the run's own {saved} {state}); pass the "
                                "path of an existing dataset yaml")
    if Path(saved).expanduser().is_file():
        return saved
    raise FileNotFoundError(f"{saved}: the data.yaml the run in {run} trained on is not there any more (moved or "
                            "deleted?); resume with --data path/to/data.yaml where the dataset is now")


def train(yolo: Any, hooks: list[HookBase] | None = None, **kwargs: Any) -> dict[str, Any]:
    """`YOLO(...).train(**kwargs)`: validate options, pick the save dir, start 1..N processes, load the best weights.

    Returns the final validation metrics ('mAP50-95', 'mAP50', 'precision', 'recall').
    """
    cfg = TrainConfig.from_kwargs(**{"model": getattr(yolo, "source", "yolov12n.yaml"), **kwargs})
    if cfg.resume == AUTO_RESUME:
        cfg, finished = _auto_resume(cfg, kwargs)
        if finished is not None:
            return _already_finished(yolo, finished)
    if cfg.resume:  # the saved options, except where to run (and the dataset, when it moved)
        cfg, save_dir = _resume_config(cfg, kwargs)
    if not cfg.data:
        raise ValueError("no data: pass data=path/to/data.yaml (YOLO format: path, train, val, names)")
    devices = parse_devices(cfg.device)  # fail before anything is written
    from .data import load_data_config

    data = load_data_config(cfg.data)
    cfg = replace(cfg, data=os.path.abspath(os.path.expanduser(cfg.data)))  # saved absolute: resumable from anywhere
    if launched_rank() != 0:  # under torchrun, a rank other than 0: rank 0 alone makes and writes the run folder
        return _run_other_rank(yolo, cfg, data.names, hooks)
    if not cfg.resume:
        save_dir = _unique_dir(cfg.project, cfg.name, cfg.exist_ok)
    made = not save_dir.exists()
    try:
        (save_dir / "weights").mkdir(parents=True, exist_ok=True)
    except OSError as e:  # "[Errno 20] Not a directory: 'runs/x/exp/weights'" named neither the option nor the fix
        raise ValueError(f"cannot make the run folder {save_dir}: {e.strerror}; give --project (project=) a folder "
                         "that can be written") from None
    yolo.save_dir = save_dir  # known from here on: a stop (Ctrl-C) can tell whether a last.pt exists

    # the starting weights travel to the ranks this process launches as a file (identical initialisation
    # everywhere); on resume the checkpoint itself gives the architecture, and `resume_from` the training state
    init_file = save_dir / "weights" / "init.pt"
    try:
        if cfg.resume:
            init_weights = str(cfg.resume)
        else:
            init_weights = str(save_checkpoint(init_file, _initial_model(yolo, data.names, cfg.seed)))
        nproc = cfg.nproc or (len(devices) if devices != ["cpu"] else 1)
        cfg_dict = cfg.to_dict()
        if nproc > 1 and not under_launcher():
            if hooks:
                raise ValueError("extra hooks are not supported with several processes: run under torchrun instead")
            metrics = launch(_launched, nproc, cfg_dict, str(save_dir), init_weights)
        else:
            metrics = _run(cfg_dict, str(save_dir), init_weights, hooks)
    finally:
        _tidy_run_dir(save_dir, init_file, made)
    best = save_dir / "weights" / "best.pt"
    if best.exists():
        yolo.ckpt = load_checkpoint(best)
        yolo.model = yolo.ckpt.model
        yolo.cfg_yaml = None  # trained: a next train() continues from these weights
    return metrics or {}


def _auto_resume(cfg: TrainConfig, kwargs: dict[str, Any]) -> tuple[TrainConfig, Path | None]:
    """`--resume auto`, for a job a scheduler restarts with the same command (a preempted pod, a requeued Slurm job):
    the run in PROJECT/NAME is continued when it has a last.pt, else started there (never in NAME2); a run that
    finished all its epochs is not trained again (its folder is returned: nothing to do), unless the command now
    asks for other options (more epochs): that is refused in one line, as a resume is."""
    run = Path(cfg.project) / cfg.name
    last = run / "weights" / "last.pt"
    if not last.is_file():
        return replace(cfg, resume=False, exist_ok=True), None
    raw = _read_resumable(last)
    saved = TrainConfig.from_kwargs(**raw["train_args"])
    if int(raw.get("epoch", -1)) + 1 >= saved.epochs:
        _refuse_fixed_options(saved, {k: getattr(cfg, k) for k in kwargs if hasattr(cfg, k)}, last, by_path=False)
        return cfg, run
    return replace(cfg, resume=True), None


def _already_finished(yolo: Any, run: Path) -> dict[str, Any]:
    """`--resume auto` of a run that finished: nothing is trained; its best weights are loaded, as after training."""
    if launched_rank() == 0:
        print(f"{run} finished its epochs already: nothing to train (--resume auto)", flush=True)
    yolo.save_dir = run
    best = run / "weights" / "best.pt"
    if best.exists():
        yolo.ckpt = load_checkpoint(best)
        yolo.model = yolo.ckpt.model
        yolo.cfg_yaml = None
    return {}


def _run_other_rank(yolo: Any, cfg: TrainConfig, names: dict[int, str],
                    hooks: list[HookBase] | None) -> dict[str, Any]:
    """A rank other than 0 under torchrun (another GPU, or another node): it trains, but writes nothing. Rank 0
    picks the run folder (NAME2 ... when NAME exists, which the ranks could see differently) and saves every
    output there; this rank's starting weights are overwritten by rank 0's. A resume reads the run's last.pt here
    too: on several nodes, the project folder must be on a file system every node mounts."""
    init = str(cfg.resume) if cfg.resume else _initial_model(yolo, names, cfg.seed)
    project_run = Path(cfg.resume).parent.parent if cfg.resume else Path(cfg.project) / cfg.name  # not created
    return _run(cfg.to_dict(), str(project_run), init, hooks) or {}


def _tidy_run_dir(save_dir: Path, init_file: Path, made: bool) -> None:
    """After a run, finished or stopped (a resumed one too): remove init.pt, which only the start reads, and a run
    folder this run made that holds nothing (stopped before its first epoch: the next run may take its name)."""
    init_file.unlink(missing_ok=True)
    if made:
        with contextlib.suppress(OSError):  # not empty: something was saved
            (save_dir / "weights").rmdir()
            save_dir.rmdir()
