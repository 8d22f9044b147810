"""Build a DetectionModel from a yaml layer list through a table of typed constructors.

The yaml layout is the ultralytics one (`[from, repeats, module, args]`), so the files users
know, and the `yaml` dict stored inside official and ultralytics checkpoints, build here too.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from torch import nn

from .attention import A2C2f, AAttn, AAttnV1
from .blocks import C3k2
from .conv import Conv
from .head import Detect
from .model import Concat, DetectionModel, ModelSpec

__all__ = ["MODEL_CONFIGS", "Scale", "build_model", "load_model_yaml", "resolve_model_yaml"]

CFG_DIR = Path(__file__).resolve().parent.parent / "cfg" / "models"
VARIANTS = {"turbo": "yolov12.yaml", "v1": "yolov12-v1.yaml"}
ATTENTION = {"turbo": AAttn, "v1": AAttnV1}
MODEL_CONFIGS = [f"yolov12{s}{suffix}.yaml" for suffix in ("", "-v1") for s in "nsmlx"]


@dataclass(frozen=True)
class Scale:
    """One row of a yaml's `scales` table."""

    depth: float
    width: float
    max_channels: int
    c3k: bool
    residual: bool
    mlp_ratio: float

    @classmethod
    def from_row(cls, row: list, scale: str, variant: str) -> Scale:
        """Our rows have six entries; ultralytics' have three, the rest follows from the scale letter."""
        if len(row) >= 6:
            return cls(float(row[0]), float(row[1]), int(row[2]), bool(row[3]), bool(row[4]), float(row[5]))
        large = scale in ("l", "x")
        return cls(float(row[0]), float(row[1]), int(row[2]), scale in ("m", "l", "x"), large,
                   (1.2 if variant == "v1" else 1.5) if large else 2.0)


@dataclass
class _Ctx:
    """What every constructor may read: the scale row, nc and the attention class of the variant."""

    scale: Scale
    nc: int
    attn: type[nn.Module]

    def channels(self, c: int) -> int:
        return int(math.ceil(min(c, self.scale.max_channels) * self.scale.width / 8) * 8)


# Each constructor: (ctx, input channels, args, repeats) -> (module, output channels).
Constructor = Callable[[_Ctx, list[int], list, int], tuple[nn.Module, int]]


def _conv(ctx: _Ctx, ch: list[int], args: list, n: int) -> tuple[nn.Module, int]:
    c2 = ctx.channels(args[0])
    return Conv(ch[0], c2, *args[1:]), c2


def _c3k2(ctx: _Ctx, ch: list[int], args: list, n: int) -> tuple[nn.Module, int]:
    c2 = ctx.channels(args[0])
    c3k = bool(args[1]) if len(args) > 1 else False
    e = float(args[2]) if len(args) > 2 else 0.5
    return C3k2(ch[0], c2, n, c3k or ctx.scale.c3k, e), c2


def _a2c2f(ctx: _Ctx, ch: list[int], args: list, n: int) -> tuple[nn.Module, int]:
    c2 = ctx.channels(args[0])
    a2 = bool(args[1]) if len(args) > 1 else True
    area = int(args[2]) if len(args) > 2 else 1
    return A2C2f(ch[0], c2, n, a2, area, residual=ctx.scale.residual, mlp_ratio=ctx.scale.mlp_ratio,
                 attn=ctx.attn), c2


def _upsample(ctx: _Ctx, ch: list[int], args: list, n: int) -> tuple[nn.Module, int]:
    return nn.Upsample(scale_factor=args[1], mode=args[2]), ch[0]


def _concat(ctx: _Ctx, ch: list[int], args: list, n: int) -> tuple[nn.Module, int]:
    return Concat(int(args[0]) if args else 1), sum(ch)


def _detect(ctx: _Ctx, ch: list[int], args: list, n: int) -> tuple[nn.Module, int]:
    return Detect(ctx.nc, tuple(ch)), 0


LAYERS: dict[str, Constructor] = {
    "Conv": _conv,
    "C3k2": _c3k2,
    "A2C2f": _a2c2f,
    "nn.Upsample": _upsample,
    "Upsample": _upsample,
    "Concat": _concat,
    "Detect": _detect,
}
REPEATED = {"C3k2", "A2C2f"}  # modules that take the repeat count as an argument


def resolve_model_yaml(name: str | Path) -> tuple[Path, str]:
    """'yolov12s.yaml' -> (the turbo yaml, 's'); 'yolov12m-v1.yaml' or 'yolo12m.yaml' -> (the v1 yaml, 'm').

    An existing path is returned as is, with the scale letter taken from its name if it has one.
    """
    path = Path(name)
    m = re.fullmatch(r"yolo(?:v)?12([nsmlx])?(-v1|-turbo)?\.ya?ml", path.name)
    if path.exists():
        return path, (m.group(1) or "") if m else ""
    if not m:
        known = ", ".join(MODEL_CONFIGS)
        raise FileNotFoundError(f"model config '{name}' not found: give a yaml path or one of {known}")
    variant = "v1" if (m.group(2) == "-v1" or path.name.startswith("yolo12")) else "turbo"
    return CFG_DIR / VARIANTS[variant], m.group(1) or "n"


def load_model_yaml(name: str | Path) -> dict:
    """Read a model yaml (by name or path) and record the scale the name asked for in `scale`."""
    path, scale = resolve_model_yaml(name)
    try:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f)
    except UnicodeDecodeError as e:  # an image or a .pt renamed: say which file, not just the codec's complaint
        raise ValueError(f"{path} is not a text YAML file (byte 0x{e.object[e.start]:02x} at position {e.start} "
                         "is not UTF-8 text); pass a model yaml such as yolov12n.yaml, or a .pt checkpoint") from None
    except yaml.reader.ReaderError as e:  # control characters: a binary file that happens to decode
        raise ValueError(f"{path} is not a text YAML file ({e.reason} at position {e.position}); pass a model "
                         "yaml such as yolov12n.yaml, or a .pt checkpoint") from None
    except yaml.YAMLError as e:
        reason = " ".join(str(e).split())
        raise ValueError(f"{path} is not valid YAML ({reason}); fix its syntax or pass a model yaml such as "
                         "yolov12n.yaml") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder; pass a model yaml file such as yolov12n.yaml") from None
    if not isinstance(d, dict) or "backbone" not in d or "head" not in d:
        raise ValueError(f"{path}: not a model yaml (needs 'backbone' and 'head' layer lists)")
    d["scale"] = scale or d.get("scale") or next(iter(d.get("scales", {"": None})))
    return d


def _arg(a, nc: int):
    if a == "nc":
        return nc
    if a == "None":
        return None
    return a


def build_model(cfg: str | Path | dict, nc: int | None = None, names: dict[int, str] | list[str] | None = None,
                variant: str | None = None) -> DetectionModel:
    """Build a DetectionModel from a yaml name, path or dict; `nc`/`names` override the yaml's class count."""
    d = copy.deepcopy(cfg) if isinstance(cfg, dict) else load_model_yaml(cfg)
    if isinstance(names, list):
        names = dict(enumerate(names))
    if nc is not None and (isinstance(nc, bool) or not isinstance(nc, int) or nc < 1):
        raise ValueError(f"nc must be a whole number of classes >= 1, got {nc!r}")
    nc = int(nc if nc is not None else len(names) if names else d.get("nc", 80))
    names = names or {int(k): str(v) for k, v in (d.get("names") or {}).items()} or {i: f"class{i}" for i in range(nc)}
    if len(names) != nc:
        raise ValueError(f"{len(names)} class names given for nc={nc}")
    variant = variant or d.get("variant", "turbo")
    if variant not in ATTENTION:
        raise ValueError(f"unknown YOLOv12 variant '{variant}': expected one of {sorted(ATTENTION)}")
    scale_name = str(d.get("scale") or "")
    scales = d.get("scales") or {}
    if scales and scale_name not in scales:
        raise ValueError(f"scale '{scale_name}' not in the yaml's scales {sorted(scales)}")
    row = scales[scale_name] if scales else [1.0, 1.0, 1024]
    ctx = _Ctx(Scale.from_row(row, scale_name, variant), nc, ATTENTION[variant])

    ch, layers, save = [3], [], set()
    for i, (f, n, name, args) in enumerate(d["backbone"] + d["head"]):
        if name not in LAYERS:
            raise ValueError(f"layer {i}: unknown module '{name}' (known: {', '.join(sorted(LAYERS))})")
        args = [_arg(a, nc) for a in args]
        n = max(round(n * ctx.scale.depth), 1) if n > 1 else n
        inputs = [ch[-1] if j == -1 else ch[j + 1] for j in ([f] if isinstance(f, int) else f)]
        build = LAYERS[name]
        if name in REPEATED or n == 1:
            module, c2 = build(ctx, inputs, args, n)
        else:  # a plain module repeated n times in sequence
            blocks = [build(ctx, inputs, args, 1) for _ in range(n)]
            module, c2 = nn.Sequential(*(b[0] for b in blocks)), blocks[0][1]
        module.i, module.f, module.type = i, f, name.removeprefix("nn.")
        save.update(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(module)
        ch.append(c2)
    spec = ModelSpec(variant=variant, scale=scale_name, nc=nc, names=names,
                     yaml={k: d[k] for k in ("nc", "scales", "backbone", "head", "variant", "scale") if k in d})
    spec.yaml["nc"] = nc
    return DetectionModel(layers, save, spec)
