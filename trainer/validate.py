"""Validation: run a model over a dataset's val split, NMS, COCO metrics (mAP50-95, mAP50, P, R, per class).

    from trainer import YOLO
    metrics = YOLO("best.pt").val(data="defects.yaml", imgsz=640)     # or: yolov12-val --weights ... --data ...

The trainer calls `Validator(dataloader, names, device, chunk=micro_batch)(ema_model)` after each epoch instead,
on rect batches of `VAL_BATCH` images (yolov12-val's default), so its mAP is the one yolov12-val reports.
Like ultralytics' validation, NMS keeps every class above `conf` per anchor (multi-label) at
conf 0.001, so its figures compare with theirs; serving engines keep the best class only.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .boxes import xywh2xyxy
from .loss import DetectionLoss
from .metrics import MetricsAccumulator
from .postprocess import non_max_suppression, scale_boxes

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

__all__ = ["VAL_BATCH", "Validator", "format_metrics", "val", "val_main"]

# images per rect batch of validation, in training as in yolov12-val: the batch fixes each batch's padded shape,
# so the mAP of the same weights would otherwise depend on --batch and the number of processes
VAL_BATCH = 16


class Validator:
    """Evaluate a model on a fixed dataloader of batches (the `trainer.data` batch layout); call it with a model.

    Returns `DetectionMetrics.as_dict()` plus 'speed_ms' (preprocess / inference / postprocess per image;
    `warmup` runs one untimed image first so one-off kernel set-up does not count as inference)
    and, when `loss` is given, 'losses' (box / cls / dfl, normalised over the whole split as in training).
    The model's train/eval mode is restored afterwards.

    chunk: most images per forward (None: the whole batch). A batch runs in chunks of that size, all at the batch's
    padded shape, so the results do not depend on it (BatchNorm in eval). A chunk that runs out of memory is
    halved and the batch run again; the smaller size is kept for the batches after it.
    """

    def __init__(self, dataloader: Iterable[dict[str, Any]], names: dict[int, str], device: str | torch.device = "cpu",
                 conf: float = 0.001, iou: float = 0.7, max_det: int = 300, half: bool = False,
                 multi_label: bool = True, loss: DetectionLoss | None = None, progress: bool = True,
                 warmup: bool = False, chunk: int | None = None) -> None:
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1 (or None for the whole batch), got {chunk}")
        self.dataloader, self.names = dataloader, dict(names)
        self.chunk = chunk
        self.device = torch.device(device)
        self.conf, self.iou, self.max_det, self.multi_label = conf, iou, max_det, multi_label
        self.half = half and self.device.type == "cuda"  # fp16 autocast on GPU only
        self.loss, self.progress, self.warmup = loss, progress, warmup

    def __call__(self, model: nn.Module) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        try:
            return self._run(model)
        finally:
            model.train(was_training)

    def _run(self, model: nn.Module) -> dict[str, Any]:
        from tqdm import tqdm

        if getattr(model, "nc", len(self.names)) != len(self.names):
            raise ValueError(f"the model predicts {model.nc} classes but the dataset has {len(self.names)}: "
                             "validate on the data the model was trained for")
        acc = MetricsAccumulator(self.names, self.max_det)
        seconds, images = np.zeros(3), 0
        loss_sums, norm_sum = torch.zeros(3), 0.0
        bar = tqdm(self.dataloader, desc="val", unit="batch", disable=not self.progress, leave=False)
        with torch.inference_mode():
            for batch in bar:
                t0 = time.perf_counter()
                img = batch["img"].to(self.device, non_blocking=True).float() / 255
                pre = self._sync(time.perf_counter()) - t0
                if self.warmup and images == 0:  # one untimed image first: lazy kernel set-up is not inference time
                    with self._autocast():
                        model(img[:1])
                t1 = self._sync(time.perf_counter())
                preds, maps = self._forward_chunked(model, img)
                t2 = self._sync(time.perf_counter())
                if self.loss is not None:
                    out = self.loss([m.float() for m in maps], _on(batch, self.device))
                    loss_sums += out.items.cpu() * max(float(out.norm), 1.0)
                    norm_sum += float(out.norm)
                t3 = time.perf_counter()
                dets = non_max_suppression(preds.float(), self.conf, self.iou, self.max_det,
                                           multi_label=self.multi_label)
                for i, det in enumerate(dets):
                    acc.add(*self._to_original(batch, i, det, img.shape[2:]))
                seconds += (pre, t2 - t1, time.perf_counter() - t3)
                images += img.shape[0]
        result = acc.compute().as_dict()
        per_image = seconds * 1000 / max(images, 1)
        result["speed_ms"] = dict(zip(("preprocess", "inference", "postprocess"), per_image.tolist()))
        result["images"] = images
        if self.loss is not None:
            result["losses"] = dict(zip(("box", "cls", "dfl"), (loss_sums / max(norm_sum, 1.0)).tolist()))
        return result

    def _forward_chunked(self, model: nn.Module,
                         img: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """`_forward` of the batch in chunks of at most `chunk` images, halving `chunk` on out of memory."""
        from .memory import is_oom

        while True:
            size = min(self.chunk or img.shape[0], img.shape[0])
            try:
                parts = []
                for a in range(0, img.shape[0], size):
                    with self._autocast():
                        parts.append(self._forward(model, img[a:a + size]))
                break
            except Exception as e:
                if not is_oom(e):
                    raise
            parts = []  # outside `except`: the failed chunk's tensors are freed before the retry
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if size == 1:
                raise torch.cuda.OutOfMemoryError(
                    f"validation ran out of memory even at 1 image per forward (input {tuple(img.shape[2:])}): "
                    "lower --imgsz, free the device, or validate separately with yolov12-val")
            self.chunk = size // 2
        preds = torch.cat([p for p, _ in parts]) if len(parts) > 1 else parts[0][0]
        if parts[0][1] is None:
            return preds, None
        return preds, [torch.cat(level) for level in zip(*(m for _, m in parts))]

    def _forward(self, model: nn.Module, img: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Eval-mode predictions [B, 4+nc, N]; also the raw head maps when the loss is wanted."""
        if self.loss is None:
            return model(img), None
        head = model.head
        head.training = True  # only the Detect module itself: it returns raw maps; its BatchNorms stay in eval
        try:
            maps = model(img)
        finally:
            head.training = False
        return head.decode(maps), maps

    @staticmethod
    def _to_original(batch: dict[str, Any], i: int, det: torch.Tensor,
                     input_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Image i's detections and labels, in original-image pixels."""
        ori_hw = tuple(int(v) for v in batch["ori_shape"][i])
        ratio_pad = batch["ratio_pad"][i] if batch.get("ratio_pad") is not None else None
        sel = torch.as_tensor(batch["batch_idx"]).view(-1) == i
        cls = torch.as_tensor(batch["cls"]).view(-1)[sel].float()
        boxes = torch.as_tensor(batch["bboxes"]).view(-1, 4)[sel].float()
        h, w = input_hw
        boxes = xywh2xyxy(boxes * torch.tensor([w, h, w, h], dtype=torch.float32))
        labels = torch.cat((cls[:, None], scale_boxes(boxes, input_hw, ori_hw, ratio_pad)), 1)
        det = det.cpu()
        det = torch.cat((scale_boxes(det[:, :4], input_hw, ori_hw, ratio_pad), det[:, 4:]), 1)
        return det.numpy(), labels.numpy()

    def _sync(self, t: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return t

    def _autocast(self):
        if self.half:
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()


def val(yolo_or_model: Any, data: str | Path | None = None, imgsz: int | None = None, batch: int = VAL_BATCH,
        device: str | int = "",
        conf: float = 0.001, iou: float = 0.7, max_det: int = 300, half: bool = False, workers: int = 0,
        plots: bool = False, save_dir: str | Path | None = None, verbose: bool = True,
        split: str = "val") -> dict[str, Any]:
    """Validate a `YOLO`, a `DetectionModel` or a checkpoint path on `data`'s `split`; returns the metrics dict.

    Keys: 'mAP50-95', 'mAP50', 'precision', 'recall', 'per_class' (name -> ap50_95, ap50, precision,
    recall, instances, images), 'speed_ms' (preprocess / inference / postprocess per image), 'pr_curve', 'imgsz'.
    `imgsz` None: the size the checkpoint was trained at (640 when it does not say), as export does. `data` None,
    for a YOLO handle: the data.yaml its checkpoint was trained on (as ultralytics' `model.val()`). `device` ''
    (default): the first GPU when there is one, else the CPU, as train and predict choose.
    """
    from .data import DetectionDataset, build_dataloader, load_data_config
    from .distributed import parse_devices

    data = data or _trained_on(yolo_or_model)
    _check_options(imgsz=imgsz, batch=batch, conf=conf, iou=iou, max_det=max_det, workers=workers)
    if isinstance(yolo_or_model, str | Path):
        _check_weights_path(yolo_or_model)
    devices = parse_devices(device)
    if len(devices) > 1:
        raise ValueError(f"validation runs on one device; got device={device!r}: pass one GPU index or cpu")
    dev = torch.device("cpu" if devices == ["cpu"] else f"cuda:{devices[0]}")
    data_cfg = load_data_config(data)  # a bad dataset fails before the model is loaded
    ckpt = _load(yolo_or_model) if isinstance(yolo_or_model, str | Path) else getattr(yolo_or_model, "ckpt", None)
    model = ckpt.model if isinstance(yolo_or_model, str | Path) else _as_model(yolo_or_model)
    if imgsz is None:
        imgsz = ckpt.imgsz if ckpt is not None else 640
    if model.nc != data_cfg.nc:
        raise ValueError(f"the model predicts {model.nc} classes but {data} has {data_cfg.nc}: "
                         "validate on the data the model was trained for")
    out = Path(save_dir or "runs/val")
    if plots:  # made before the evaluation, so an unwritable folder fails in a second, not after the whole split
        _make_save_dir(out)
    dataset = DetectionDataset(data_cfg, split, imgsz=imgsz, augment=False, rect=True, batch_size=batch,
                               verbose=False)
    if dataset.report.needs_attention:  # what was skipped or changed, always; the plain count with the metrics
        print(dataset.report.summary(), file=sys.stderr, flush=True)
    elif verbose:
        print(dataset.report.summary(), flush=True)
    loader = build_dataloader(dataset, batch, workers, shuffle=False, rank=0, world_size=1)
    validator = Validator(loader, data_cfg.names, dev, conf=conf, iou=iou, max_det=max_det, half=half,
                          progress=verbose, warmup=True)
    metrics = validator(copy.deepcopy(model).fuse().to(dev))  # BatchNorm folded, the caller's model untouched
    metrics["imgsz"] = imgsz
    if verbose:
        print(format_metrics(metrics))
    if plots:
        from .plots import plot_pr_curve

        metrics["plots"] = [str(plot_pr_curve(metrics, out / "PR_curve.png"))]
    return metrics


def format_metrics(metrics: dict[str, Any]) -> str:
    """The per-class table ultralytics users know: Class, Images, Instances, P, R, mAP50, mAP50-95."""
    head = f"{'Class':>22}{'Images':>11}{'Instances':>11}{'P':>11}{'R':>11}{'mAP50':>11}{'mAP50-95':>11}"
    per = metrics.get("per_class", {})
    total = sum(v["instances"] for v in per.values())
    rows = [head, f"{'all':>22}{metrics.get('images', 0):>11}{total:>11}{metrics['precision']:>11.3g}"
                  f"{metrics['recall']:>11.3g}{metrics['mAP50']:>11.3g}{metrics['mAP50-95']:>11.3g}"]
    for name, v in per.items():
        rows.append(f"{name:>22}{v['images']:>11}{v['instances']:>11}{v['precision']:>11.3g}{v['recall']:>11.3g}"
                    f"{v['ap50']:>11.3g}{v['ap50_95']:>11.3g}")
    speed = metrics.get("speed_ms")
    if speed:
        rows.append("Speed: " + ", ".join(f"{v:.1f} ms {k}" for k, v in speed.items()) + " per image")
    return "\n".join(rows)


def val_main(argv: list[str] | None = None) -> int:
    """yolov12-val --weights best.pt --data data.yaml [--imgsz --batch --device ...]; exit status 0 on success."""
    from .cli import OneLineParser

    p = OneLineParser(prog="yolov12-val", description="mAP of a checkpoint on a dataset split (COCO metrics)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--weights", required=True, help="checkpoint (.pt): ours, official YOLOv12 or ultralytics "
                   "(not an exported .onnx/.engine)")
    p.add_argument("--data", required=True, help="data.yaml (YOLO format)")
    p.add_argument("--imgsz", type=int, default=None, help="inference size (default: the training size)")
    p.add_argument("--batch", type=int, default=VAL_BATCH, help="images per batch (default: %(default)s)")
    p.add_argument("--device", default="", help="cpu or one GPU index (default: the first GPU, else cpu)")
    p.add_argument("--conf", type=float, default=0.001,
                   help="confidence threshold, in [0, 1) (default: %(default)s, the usual for mAP)")
    p.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold, in (0, 1] (default: %(default)s)")
    p.add_argument("--max-det", type=int, default=300, help="most detections per image (default: %(default)s)")
    p.add_argument("--half", action="store_true", help="fp16 inference (GPU only)")
    p.add_argument("--workers", type=int, default=0,
                   help="dataloader worker processes (default: %(default)s = load in the main process)")
    p.add_argument("--split", default="val", choices=("train", "val", "test"),
                   help="dataset split to evaluate (default: %(default)s)")
    p.add_argument("--plots", action="store_true", help="write PR_curve.png into --save-dir")
    p.add_argument("--save-dir", default="runs/val", help="folder for --plots output (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        val(args.weights, data=args.data, imgsz=args.imgsz, batch=args.batch, device=args.device, conf=args.conf,
            iou=args.iou, max_det=args.max_det, half=args.half, workers=args.workers, plots=args.plots,
            save_dir=args.save_dir, split=args.split)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # DataError, CheckpointError and friends
        print(f"yolov12-val: error: {e}", file=sys.stderr)
        return 2
    return 0


def _trained_on(obj: Any) -> str:
    """The data.yaml the checkpoint of a YOLO handle was trained on (still there); ValueError asking for one else."""
    ckpt = getattr(obj, "ckpt", None)
    saved = ((ckpt.meta.get("train_args") or {}).get("data") if ckpt is not None else None) or ""
    if isinstance(saved, str) and saved and Path(saved).expanduser().is_file():
        return saved
    gone = f" (the checkpoint's own {saved} is not there any more)" if isinstance(saved, str) and saved else ""
    raise ValueError(f"no data: pass data=path/to/data.yaml (YOLO format: path, train, val, names){gone}")


def _as_model(obj: Any) -> nn.Module:
    """A YOLO handle or a DetectionModel -> the nn.Module."""
    if isinstance(obj, nn.Module):
        return obj
    if hasattr(obj, "model") and isinstance(obj.model, nn.Module):
        return obj.model
    raise TypeError(f"cannot validate a {type(obj).__name__}: pass a YOLO, a DetectionModel or a .pt path")


def _check_options(*, imgsz: int | None, batch: int, conf: float, iou: float, max_det: int, workers: int) -> None:
    """Refuse out-of-range options up front (as predict and export do), before a model or dataset is loaded."""
    if imgsz is not None and (imgsz < 32 or imgsz % 32):
        raise ValueError(f"imgsz must be a multiple of 32 (>= 32), got {imgsz}: e.g. 640")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if not 0 <= conf < 1:  # also refuses nan
        raise ValueError(f"conf must be in [0, 1), got {conf}: 0.001 gives the usual mAP")
    if not 0 < iou <= 1:
        raise ValueError(f"iou must be in (0, 1], got {iou}: 0.7 is the usual NMS threshold")
    if max_det < 1:
        raise ValueError(f"max_det must be >= 1, got {max_det}: 300 is the usual")
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0 = load in the main process), got {workers}")


def _check_weights_path(path: str | Path) -> None:
    """Validation runs the PyTorch model: an exported engine has none, so say so instead of a pickle error."""
    from .yolo import ENGINE_SUFFIXES

    if Path(path).suffix.lower() in ENGINE_SUFFIXES:
        raise ValueError(f"'{path}' is an exported engine: val needs a .pt checkpoint (an exported .onnx/.engine "
                         "cannot be validated here); pass the .pt it was exported from")


def _make_save_dir(out: Path) -> None:
    """Create the folder the plots go to, or say in one line why it cannot be."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the save folder '{out}' ({e.strerror or e}): pass a writable folder "
                         "with --save-dir") from None


def _load(path: str | Path) -> Checkpoint:
    from .checkpoint import load_checkpoint

    if not Path(path).exists():
        raise FileNotFoundError(f"weights '{path}' not found: pass the path of a .pt checkpoint")
    return load_checkpoint(path)


def _on(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) and k != "img" else v for k, v in batch.items()}
