"""Training options: one dataclass, its defaults the official YOLOv12 recipe (see reference/yolov12.md)."""

from __future__ import annotations

import difflib
import math
import numbers
import os
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["AUTO_RESUME", "TrainConfig", "parse_bytes"]

AUTO_RESUME = "auto"  # resume="auto": continue PROJECT/NAME if it has a last.pt, else start it (a restarted job)


@dataclass
class TrainConfig:
    """Everything `YOLO(...).train(**kw)` and `yolov12-train` accept. Unknown keys are an error."""

    # what and where
    model: str = "yolov12n.yaml"
    data: str = ""
    epochs: int = 100
    imgsz: int = 640
    batch: int = 16  # GLOBAL batch: split across processes, then into micro-batches
    device: str = ""  # "" = all visible GPUs' first ("0") else "cpu"; "0,1,2,3" = one process per GPU
    nproc: int = 0  # processes on this machine; 0 = one per listed GPU (1 on CPU). CPU DDP uses gloo
    workers: int = 8  # dataloader workers per process
    project: str = "runs/train"
    name: str = "exp"
    exist_ok: bool = False
    resume: bool | str = False  # True = PROJECT/NAME/weights/last.pt, or a path, or AUTO_RESUME
    cache: bool | str = False  # False | "ram" | "disk"
    rect: bool = False  # rectangular batches: aspect-ratio groups, each padded to its own shape (no mosaic)
    seed: int = 0
    deterministic: bool = False

    # memory and speed
    amp: str = "auto"  # auto: bf16 where the GPU supports it, else fp16 + grad scaler; fp32 on CPU | bf16 | fp16 | off
    grad_checkpointing: str = "auto"  # off | on | auto (on when it lets a larger micro-batch fit)
    micro_batch: int = 0  # 0 = auto (probe GPU memory; the whole per-process batch on CPU)
    memory_budget: str = ""  # peak bytes per process the probe plans for ("40GB"); "" = 90% of the GPU, no probe on CPU
    sync_bn: bool = False
    dist_timeout: float = 1800.0  # seconds before a collective gives up (a dead rank ends the run)

    # optimisation
    optimizer: str = "auto"  # auto | SGD | AdamW
    lr0: float = 0.01
    lrf: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 5e-4
    nbs: int = 64  # nominal batch: smaller batches are accumulated up to it per step (ultralytics)
    warmup_epochs: float = 3.0
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.0
    cos_lr: bool = False
    ema: bool = True
    ema_decay: float = 0.9999
    ema_tau: float = 2000.0
    clip_grad: float = 10.0
    box: float = 7.5
    cls: float = 0.5
    dfl: float = 1.5

    # augmentation (None = the per-scale default of the official recipe)
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    degrees: float = 0.0
    translate: float = 0.1
    scale: float | None = None
    shear: float = 0.0
    perspective: float = 0.0
    flipud: float = 0.0
    fliplr: float = 0.5
    mosaic: float = 1.0
    mixup: float | None = None
    copy_paste: float | None = None
    close_mosaic: int = 10

    # validation, saving, logging
    val: bool = True
    patience: int = 100  # stop after this many epochs without a better fitness (0: never)
    save_period: int = -1  # also keep epoch{N}.pt every N epochs
    plots: bool = True
    verbose: bool = True

    @classmethod
    def from_kwargs(cls, /, **kwargs: Any) -> TrainConfig:
        """Build from keyword arguments; an unknown key is a ValueError naming the closest valid one."""
        names = {f.name for f in fields(cls)}
        for key in kwargs:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(f"unknown training option '{key}'{hint}")
        types = {f.name: str(f.type) for f in fields(cls)}
        cfg = cls(**{key: _plain(key, types[key], value) for key, value in kwargs.items()})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Reject values that would fail later, with the fix in the message."""
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.imgsz < 32 or self.imgsz % 32:
            raise ValueError(f"imgsz must be a multiple of 32 (>= 32), got {self.imgsz}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"amp must be auto, bf16, fp16 or off, got '{self.amp}'")
        if self.grad_checkpointing not in ("auto", "on", "off"):
            raise ValueError(f"grad_checkpointing must be auto, on or off, got '{self.grad_checkpointing}'")
        if self.optimizer not in ("auto", "SGD", "AdamW"):
            raise ValueError(f"optimizer must be auto, SGD or AdamW, got '{self.optimizer}'")
        if self.cache not in (False, True, "ram", "disk"):
            raise ValueError(f"cache must be false, ram or disk, got '{self.cache}'")
        if self.micro_batch < 0:
            raise ValueError(f"micro_batch must be >= 0 (0 = automatic), got {self.micro_batch}")
        if self.memory_budget:
            parse_bytes(self.memory_budget)
        self._validate_numbers()

    def _validate_numbers(self) -> None:
        """Counts, optimisation and augmentation values in their sensible ranges (and finite), so a nonsense value
        is refused before any run folder is made rather than training on it or failing epochs later."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        counts = {"nproc": (0, "0 = one per listed GPU"), "workers": (0, "0 = load in the main process"),
                  "seed": (0, "numpy takes no negative seed"), "close_mosaic": (0, "0 = keep mosaic to the end"),
                  "patience": (0, "epochs without improvement before stopping early; 0 = never"),
                  "nbs": (1, "the nominal batch, 64 in the recipe")}
        for name, (low, meaning) in counts.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low} ({meaning}), got {getattr(self, name)}")
        if self.save_period < -1:
            raise ValueError(f"save_period must be >= 1 (keep epochN.pt every N epochs) or -1 (off), "
                             f"got {self.save_period}")
        if self.lr0 <= 0:
            raise ValueError(f"lr0 must be > 0 (the initial learning rate, e.g. 0.01 for SGD), got {self.lr0}")
        if self.dist_timeout <= 0:
            raise ValueError(f"dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        if self.ema_tau <= 0:
            raise ValueError(f"ema_tau must be > 0 (EMA warm-up in iterations), got {self.ema_tau}")
        for name in ("weight_decay", "warmup_epochs", "warmup_bias_lr", "clip_grad", "box", "cls", "dfl"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        ranges = {"lrf": "final learning rate = lr0 x lrf", "momentum": "SGD momentum / Adam beta1",
                  "warmup_momentum": "momentum at the start of warm-up", "ema_decay": "EMA decay",
                  # the augmentation strengths and probabilities (trainer.data.augment.check_hyp checks the same)
                  "hsv_h": "a fraction", "hsv_s": "a fraction", "hsv_v": "a fraction", "translate": "a fraction",
                  "flipud": "a probability", "fliplr": "a probability", "mosaic": "a probability",
                  "mixup": "a probability", "copy_paste": "a probability"}
        for name, meaning in ranges.items():
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1] ({meaning}), got {value}")
        if self.scale is not None and not 0 <= self.scale < 1:
            raise ValueError(f"scale must be in [0, 1) (zoom range 1 +/- scale), got {self.scale}")
        if not 0 <= self.perspective <= 0.001:
            raise ValueError(f"perspective must be in [0, 0.001], got {self.perspective}")

    def augment_defaults(self, scale_letter: str) -> None:
        """Fill scale / mixup / copy_paste left at None with the official per-scale values."""
        from .data.augment import scale_defaults

        defaults = scale_defaults(scale_letter if scale_letter in "nsmlx" and scale_letter else "n")
        for key, value in defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _plain(name: str, annotation: str, value: Any) -> Any:
    """`value` as the plain type its field is annotated with, or a ValueError naming the option. A Path becomes text
    (the options are saved in every checkpoint, and `torch.load(weights_only=True)` refuses a pickled Path: with
    project=Path(...) kept as given, no tool could load the run's best.pt); numpy numbers become Python ones;
    device=0 or [0, 1] becomes '0' / '0,1'; amp=True / False (ultralytics' flag) becomes 'auto' / 'off'."""
    kinds = annotation.replace(" ", "").split("|")
    if value is None and "None" in kinds:
        return None
    if isinstance(value, bool):
        if "bool" in kinds:
            return value
        if name == "amp":
            return "auto" if value else "off"
    elif isinstance(value, numbers.Integral) and "int" in kinds:
        return int(value)
    elif isinstance(value, numbers.Real) and "float" in kinds:
        return float(value)
    elif isinstance(value, str | os.PathLike) and "str" in kinds:
        return os.fspath(value)
    elif name == "device" and isinstance(value, int | list | tuple):
        return ",".join(str(d) for d in (value if isinstance(value, list | tuple) else [value]))
    want = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "text"}
    raise ValueError(f"{name} must be {' or '.join(want.get(k, k) for k in kinds)}, got {value!r}")


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """'24GB', '512MiB', '1.5e9' or a number -> bytes; ValueError with the accepted forms otherwise."""
    if isinstance(text, int | float):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"memory size '{text}': use bytes or a unit, e.g. 24GB, 40GiB, 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])
