"""Console scripts: yolov12-train, yolov12-val, yolov12-export, yolov12-data.

Every option of `TrainConfig` is a flag (`--cos-lr`, `--micro-batch 8`, `--no-val` ...). Bad
input ends with one readable line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from yolov12_serve.argparsing import OneLineParser

from . import __version__
from .config import AUTO_RESUME, TrainConfig
from .torchrun_env import launched_rank, under_launcher

__all__ = ["OneLineParser", "data_main", "export_main", "train_main", "val_main"]

_HELP = {
    "model": "model yaml (yolov12n.yaml ... yolov12x.yaml turbo, yolov12n-v1.yaml ... v1) or a .pt to fine-tune",
    "data": "dataset yaml (YOLO format: path, train, val, names)",
    "epochs": "number of epochs to train for",
    "imgsz": "training image size in pixels, a multiple of 32",
    "batch": "GLOBAL batch size, split across GPUs and then into micro-batches as memory requires",
    "device": "cpu, 0, or 0,1,2,3 (one process per GPU); default: GPU 0 if present else cpu",
    "nproc": "processes on this machine: 0 = one per GPU listed, 1 on CPU (CPU DDP uses gloo)",
    "workers": "dataloader worker processes per training process (0 = load in the main process)",
    "project": "folder the runs are saved in",
    "name": "run name: results go to PROJECT/NAME (NAME2, NAME3 ... when it exists)",
    "exist_ok": "reuse PROJECT/NAME when it exists instead of numbering a new one",
    "deterministic": "deterministic algorithms only: bitwise-repeatable runs, somewhat slower",
    "sync_bn": "synchronise BatchNorm statistics across GPUs",
    "dist_timeout": "seconds a collective waits for the other processes before the run gives up",
    "optimizer": "optimizer; auto picks SGD or AdamW and its learning rate from the run length",
    "lr0": "initial learning rate (e.g. SGD 1e-2, AdamW 1e-3)",
    "lrf": "final learning rate as a fraction of lr0 (lr0 * lrf)",
    "momentum": "SGD momentum / AdamW beta1",
    "weight_decay": "optimizer weight decay (L2), relative to the nominal batch",
    "nbs": "nominal batch: smaller batches are accumulated up to it per optimizer step; weight decay is relative to it",
    "warmup_epochs": "warm-up epochs (fractions ok; 0 = none)",
    "warmup_momentum": "momentum at the start of warm-up",
    "warmup_bias_lr": "bias learning rate at the start of warm-up",
    "ema": "keep an exponential moving average of the weights (validated and saved)",
    "ema_decay": "EMA decay",
    "ema_tau": "EMA warm-up, in iterations",
    "clip_grad": "clip the gradient norm to this (0 = no clipping)",
    "box": "box loss gain",
    "cls": "classification loss gain",
    "dfl": "distribution focal loss gain",
    "hsv_h": "image HSV-hue augmentation (fraction)",
    "hsv_s": "image HSV-saturation augmentation (fraction)",
    "hsv_v": "image HSV-value augmentation (fraction)",
    "degrees": "image rotation (+/- degrees)",
    "translate": "image translation (+/- fraction)",
    "scale": "image scale (+/- gain) (default: per model scale, 0.5 for n, 0.9 for s..x)",
    "shear": "image shear (+/- degrees)",
    "perspective": "image perspective (+/- fraction), 0..0.001",
    "flipud": "image flip up-down (probability)",
    "fliplr": "image flip left-right (probability)",
    "mosaic": "image mosaic (probability)",
    "mixup": "image mixup (probability) (default: per model scale, 0 for n ... 0.2 for x)",
    "copy_paste": "copy-paste of objects (probability) (default: per model scale, 0.1 for n ... 0.6 for x)",
    "close_mosaic": "turn mosaic off for the final N epochs (0 = keep it on)",
    "val": "validate after each epoch",
    "patience": "stop early after this many epochs without a better fitness (0: never)",
    "save_period": "also keep weights/epochN.pt every N epochs (-1 = off)",
    "plots": "save plots (results.png, PR curve)",
    "verbose": "print progress and per-epoch results",
    "micro_batch": "images per forward/backward (0 = probe GPU memory automatically)",
    "memory_budget": "peak memory per process the automatic micro-batch plans for, e.g. 40GB or 20GiB "
                     "(default: 90%% of the GPU; on a CPU, set it to probe there too)",
    "rect": "rectangular training batches: images grouped by aspect ratio, each batch padded only to its own "
            "shape (no mosaic); saves compute on wide or tall images",
    "seed": "seeds the initial weights of a model built from a yaml, the data order and every augmentation",
    "grad_checkpointing": "recompute activations in backward: auto (when it lets more fit), on, off",
    "amp": "mixed precision: auto (bf16 where supported, else fp16; fp32 on CPU), bf16, fp16, off",
    "resume": "continue the run in PROJECT/NAME (or give the path of a last.pt) with its own options; only where "
              "and how it runs (--device, --nproc, --workers, --micro-batch, --memory-budget ...) may be given. "
              "--resume auto (for jobs a scheduler restarts): continue PROJECT/NAME if it has a last.pt, else start "
              "it there; a finished run is not trained again",
    "cache": "cache decoded images: ram or disk",
    "cos_lr": "cosine LR schedule instead of linear",
}


_CHOICES = {"amp": ["auto", "bf16", "fp16", "off"], "grad_checkpointing": ["auto", "on", "off"],
            "optimizer": ["auto", "SGD", "AdamW"]}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `TrainConfig` field. Defaults are left out of the parsed result (SUPPRESS; `--help` states
    them): only the options the user typed reach `train()`, so that a resume can tell them from its saved ones."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        shown = f"(default: {default})" if default not in (None, "") else ""
        help_text = " ".join(part for part in (_HELP.get(f.name, ""), shown) if part)
        hint = hints[f.name]
        if hint is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif f.name in ("resume", "cache"):  # bool | str: a bare flag means True, or give a value
            parser.add_argument(flag, dest=f.name, nargs="?", const=True, default=argparse.SUPPRESS, help=help_text)
        else:
            base = {int: int, float: float, str: str}.get(typing.get_args(hint)[0] if typing.get_args(hint) else hint,
                                                          str)
            parser.add_argument(flag, dest=f.name, type=base, default=argparse.SUPPRESS, help=help_text,
                                choices=_CHOICES.get(f.name))


class TerminatedError(Exception):
    """SIGTERM (a scheduler's stop, `kill`): ends training like Ctrl-C, with a line instead of a traceback."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise TerminatedError


def _stopped(yolo: object, signum: int) -> int:
    """One line for a run stopped by Ctrl-C (exit 130) or SIGTERM (143): how to resume it, or, before its first
    epoch saved a last.pt, that there is nothing to resume yet."""
    how, status = ("interrupted", 130) if signum == signal.SIGINT else ("terminated", 143)
    save_dir = getattr(yolo, "save_dir", None)
    if launched_rank() != 0:  # under torchrun: rank 0 holds the run folder and says whether it can be resumed
        print(f"yolov12-train: {how}", file=sys.stderr)
    elif save_dir is not None and (Path(save_dir) / "weights" / "last.pt").is_file():
        print(f"yolov12-train: {how} (resume with --resume)", file=sys.stderr)
    else:
        print(f"yolov12-train: {how} before the first epoch finished: nothing can be resumed yet; start the run "
              "again", file=sys.stderr)
    return status


def _fail(prog: str, e: BaseException) -> int:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2


def _fail_train(e: BaseException) -> int:
    """`_fail` for yolov12-train; under torchrun, before this rank joined the others, its error is posted for them
    too (they stop with it at once instead of waiting --dist-timeout for this rank)."""
    if under_launcher():
        from .distributed import report_start_failure

        report_start_failure(str(e))
    return _fail("yolov12-train", e)


def _torch_missing(prog: str) -> int:
    """2 with one line saying how to install PyTorch when it is missing (the serving install has none), else 0."""
    from . import require_torch

    try:
        require_torch(prog)
    except ModuleNotFoundError as e:
        return _fail(prog, e)
    return 0


def train_main(argv: list[str] | None = None) -> int:
    """yolov12-train: train a YOLOv12 model on one GPU, several, several machines (torchrun) or the CPU."""
    parser = OneLineParser(
        prog="yolov12-train",
        description="Train YOLOv12. Writes PROJECT/NAME/weights/{last,best}.pt, results.csv and plots. "
                    "A global batch of any size fits: it is split across GPUs, then into micro-batches.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_config_flags(parser)
    args = vars(parser.parse_args(argv))  # the options typed, nothing else (see _add_config_flags)
    if _torch_missing("yolov12-train"):
        return 2
    from .data.config import load_data_config

    try:  # option and data errors come before torch is even imported
        TrainConfig.from_kwargs(**args)
        if args.get("resume") in (None, AUTO_RESUME):  # auto: a new run when there is nothing to resume
            if not args.get("data"):
                raise ValueError("no dataset given: add --data path/to/data.yaml (YOLO format: path, train, val, "
                                 "names; `yolov12-data synth --out DIR` writes one), or --resume a run")
            load_data_config(args["data"])
    except (ValueError, FileNotFoundError) as e:
        return _fail_train(e)
    from . import YOLO
    from .checkpoint import CheckpointError

    signal.signal(signal.SIGTERM, _on_sigterm)
    yolo = None
    try:
        yolo = YOLO(args.get("model", TrainConfig.model))
        metrics = yolo.train(**args)
    except KeyboardInterrupt:
        return _stopped(yolo, signal.SIGINT)
    except (ValueError, OSError, CheckpointError, RuntimeError, TypeError) as e:  # OSError: a full disk too
        return _fail_train(e)
    except Exception as e:
        # with several processes torch's launcher stops the ranks and raises its own SignalException (with the signal)
        if not isinstance(e, TerminatedError) and type(e).__name__ != "SignalException":
            raise
        return _stopped(yolo, getattr(e, "sigval", signal.SIGTERM))
    if launched_rank() != 0:  # under torchrun: rank 0 wrote the run and says where
        return 0
    if metrics:
        print("final: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    weights = Path(yolo.save_dir) / "weights"
    print(f"weights: {weights / 'best.pt'} (the best epoch), {weights / 'last.pt'} (the last)")
    return 0


def val_main(argv: list[str] | None = None) -> int:
    """yolov12-val: mAP of a checkpoint on a dataset's val split."""
    if _torch_missing("yolov12-val"):
        return 2
    from .validate import val_main as run

    return run(argv)


def export_main(argv: list[str] | None = None) -> int:
    """yolov12-export: write an ONNX model or a TensorRT engine with its metadata inside."""
    if _torch_missing("yolov12-export"):
        return 2
    from .export import export_main as run

    return run(argv)


def data_main(argv: list[str] | None = None) -> int:
    """yolov12-data synth: generate a synthetic factory-defect dataset."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(f"yolov12-data {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: yolov12-data synth --out DIR [--images N] [--imgsz S] [--seed K] [--val-fraction F]\n\n"
              "  synth    textured factory surfaces with labelled defects (scratch, dent, crack, stain, missing_part)")
        return 0 if argv else 2
    if argv[0] != "synth":
        return _fail("yolov12-data", ValueError(f"unknown command '{argv[0]}': expected 'synth'"))
    from .data.synth import synth_main

    return synth_main(argv[1:])


if __name__ == "__main__":
    sys.exit(train_main())
