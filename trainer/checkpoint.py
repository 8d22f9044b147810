"""Checkpoints: the project's own format, and official / ultralytics `.pt` files without ultralytics.

Our format is a plain dict (tensors, numbers, strings) that `torch.load(weights_only=True)`
reads. Official and ultralytics files pickle whole `DetectionModel` objects; they are read
through a restricted unpickler that builds nothing but tensors and plain containers: every
module class becomes an inert stand-in whose attributes we walk to a flat state dict, and
any other global (a function a malicious pickle would call) is refused. The architecture
(variant, scale, groups, nc, names) is then read from the checkpoint itself.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import re
import shutil
import signal
import threading
import types
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from .nn import DetectionModel, ModelSpec, build_model
from .nn.builder import VARIANTS, load_model_yaml

__all__ = ["FORMAT", "Checkpoint", "CheckpointError", "load_checkpoint", "load_raw", "read_ultralytics",
           "save_checkpoint"]

FORMAT = "yolov12-serve/1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message says why and what to do."""


class Checkpoint:
    """A loaded checkpoint: the model (fp32, eval mode) and everything else the file carried."""

    def __init__(self, model: DetectionModel, meta: dict[str, Any], raw: dict[str, Any], source: str) -> None:
        self.model, self.meta, self.raw, self.source = model, meta, raw, source

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    @property
    def imgsz(self) -> int:
        return int(self.meta.get("imgsz") or 640)


# ----------------------------------------------------------------------------- restricted unpickling
class _Stub:
    """Inert stand-in for a pickled module class: keeps the pickled attributes, runs nothing."""

    _qualname = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) form
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)

    def __setitem__(self, key, value) -> None:  # dict subclasses (IterableSimpleNamespace & co)
        self.__dict__[key] = value


_STUBS: dict[tuple[str, str], type] = {}


def _stub_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _STUBS:
        _STUBS[key] = type(name, (_Stub,), {"_qualname": f"{module}.{name}"})
    return _STUBS[key]


def _path(*parts: str) -> str:
    return str(PurePosixPath(*parts))


# Globals a checkpoint may name that build data, never run code.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
    ("__builtin__", "set"): set, ("builtins", "complex"): complex,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size, ("torch", "device"): torch.device,
    ("pathlib", "PosixPath"): _path, ("pathlib", "WindowsPath"): lambda *p: str(PureWindowsPath(*p)),
    ("pathlib", "Path"): _path, ("pathlib", "PurePosixPath"): _path,
    ("datetime", "datetime"): datetime.datetime, ("datetime", "date"): datetime.date,
    ("_codecs", "encode"): lambda text, encoding="utf-8": str(text).encode(encoding),  # protocol 2 bytes
}
_STUB_MODULES = ("ultralytics.", "models.", "utils.", "torch.nn.modules.", "torch.nn.parameter", "types", "argparse")


def _numpy_global(module: str, name: str) -> Any:
    import numpy as np

    if name == "dtype":
        return np.dtype
    if name == "scalar":  # numpy.core.multiarray.scalar(dtype, bytes)
        return lambda dtype, data=b"": np.frombuffer(data, dtype=dtype)[0] if data else dtype.type()
    if name == "_reconstruct":
        try:
            from numpy._core.multiarray import _reconstruct
        except ImportError:  # numpy < 2
            from numpy.core.multiarray import _reconstruct
        return _reconstruct
    if name == "ndarray":
        return np.ndarray
    raise KeyError(name)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.split(".")[0] == "numpy":
            try:
                return _numpy_global(module, name)
            except KeyError:
                pass
        if module == "copyreg" and name == "_reconstructor":
            return _reconstructor
        if module.startswith(_STUB_MODULES) or module in ("types", "argparse", "torch.nn.parameter"):
            if name == "Parameter" and module == "torch.nn.parameter":
                return torch.nn.Parameter
            return _stub_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load '{module}.{name}': the checkpoint asks to run code that a model file never needs "
            "(it may be malicious). Only load checkpoints from sources you trust."
        )


def _reconstructor(cls: type, base: type, state: Any) -> Any:
    if not (isinstance(cls, type) and issubclass(cls, _Stub)):
        raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}: not a model class")
    return object.__new__(cls)


_restricted_pickle = types.ModuleType("yolov12_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = lambda f, **kw: _RestrictedUnpickler(f, **kw).load()
_restricted_pickle.__name__ = "pickle"  # torch.load checks for the pickle protocol by this name


def _flatten(obj: Any, prefix: str = "", out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Walk a stand-in module tree (`_parameters`, `_buffers`, `_modules`) to a flat state dict."""
    out = {} if out is None else out
    state = getattr(obj, "__dict__", {})
    non_persistent = state.get("_non_persistent_buffers_set", set()) or set()
    for kind in ("_parameters", "_buffers"):
        for k, v in (state.get(kind) or {}).items():
            if v is not None and not (kind == "_buffers" and k in non_persistent):
                out[prefix + k] = v.detach() if isinstance(v, torch.Tensor) else v
    for k, child in (state.get("_modules") or {}).items():
        if child is not None:
            _flatten(child, f"{prefix}{k}.", out)
    return out


def strip_ddp_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the `module.` prefix a DistributedDataParallel wrapper adds to every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def load_raw(path: str | Path) -> Any:
    """A .pt's contents without running its code: torch's weights-only load, else (a file that pickles classes: an
    official / ultralytics one, or ours whose options held a pathlib.Path or a numpy number) the restricted
    unpickler, which builds data only. pickle.UnpicklingError when the file asks for anything else."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return torch.load(path, map_location="cpu", pickle_module=_restricted_pickle, weights_only=False)


def read_ultralytics(path: str | Path, raw: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an official / ultralytics `.pt` without ultralytics: (flat state dict, info dict). `raw`: its contents
    when already loaded (`load_raw`)."""
    if raw is None:
        try:
            raw = torch.load(path, map_location="cpu", pickle_module=_restricted_pickle, weights_only=False)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path}: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a checkpoint (a {type(raw).__name__}, expected a dict with 'model')")
    net = raw.get("ema") or raw.get("model")
    if net is None:
        raise CheckpointError(f"{path}: the checkpoint holds no 'model' or 'ema' entry")
    state = strip_ddp_prefix(net if isinstance(net, dict) and all(isinstance(v, torch.Tensor) for v in net.values())
                             else _flatten(net))
    attrs = getattr(net, "__dict__", {})
    names = attrs.get("names") or raw.get("names")
    if isinstance(names, list | tuple):
        names = dict(enumerate(names))
    train_args = raw.get("train_args")
    train_args = dict(getattr(train_args, "__dict__", train_args) or {})
    info = {"yaml": attrs.get("yaml"), "names": names, "train_args": train_args, "epoch": raw.get("epoch"),
            "version": raw.get("version"), "date": raw.get("date")}
    return state, info


# ----------------------------------------------------------------------------- architecture from weights
def _variant_of(state: dict[str, torch.Tensor]) -> str:
    if any(".attn.qkv." in k for k in state):
        return "v1"
    if any(".attn.qk." in k for k in state):
        return "turbo"
    raise CheckpointError("no area-attention weights found: this does not look like a YOLOv12 checkpoint")


def _nc_of(state: dict[str, torch.Tensor]) -> int:
    keys = [k for k in state if re.fullmatch(r"model\.\d+\.cv3\.0\.2\.weight", k)]
    if not keys:
        raise CheckpointError("no Detect head (model.N.cv3.0.2.weight) in the checkpoint")
    return int(state[keys[0]].shape[0])


def _shapes_match(model: DetectionModel, state: dict[str, torch.Tensor]) -> list[str]:
    own = model.state_dict()
    bad = [k for k in own if k not in state or own[k].shape != state[k].shape]
    bad += [k for k in state if k not in own]
    return bad


def model_from_state(state: dict[str, torch.Tensor], names: dict[int, str] | None = None,
                     yaml_dict: dict | None = None) -> DetectionModel:
    """Build the model a state dict belongs to (variant, scale, groups and nc read from it) and load it."""
    state = strip_ddp_prefix(state)
    variant, nc = _variant_of(state), _nc_of(state)
    if names and len(names) != nc:
        names = None
    candidates: list[dict] = []
    if yaml_dict and "backbone" in yaml_dict:
        candidates.append(dict(yaml_dict))
    base = load_model_yaml(Path(__file__).parent / "cfg" / "models" / VARIANTS[variant])
    for scale in "nsmlx":
        candidates.append({**base, "scale": scale})
    for cand in candidates:
        try:
            model = build_model(cand, nc=nc, names=names, variant=variant)
        except (ValueError, KeyError, IndexError, TypeError):
            continue
        if not _shapes_match(model, state):
            model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
            return model.eval()
    raise CheckpointError(f"the weights match no YOLOv12 {variant} scale (n/s/m/l/x): is this a YOLOv12 detection "
                          "checkpoint?")


# ----------------------------------------------------------------------------- our format
def save_checkpoint(path: str | Path, model: DetectionModel, **extra: Any) -> Path:
    """Write our checkpoint: weights (fp32 state dict), the model spec, and `extra` (plain data only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = getattr(model, "module", model)  # unwrap DDP
    ckpt = {"format": FORMAT, "spec": net.spec.to_dict(), "model": {k: v.detach().cpu() for k, v in
                                                                     net.state_dict().items()},
            "date": datetime.datetime.now().isoformat(timespec="seconds"), **extra}
    tmp = path.with_suffix(path.suffix + ".tmp")
    with _stops_held():  # a SIGTERM or Ctrl-C mid-write would tear the file (torch: "unexpected pos"): after it
        _write(ckpt, path, tmp)
    return path


@contextlib.contextmanager
def _stops_held() -> Iterator[None]:
    """SIGINT and SIGTERM during the block are held and handled when it ends, as they would have been: a checkpoint
    being written is finished first. Their Python handlers raised inside torch.save's writes, which torch turned
    into "[enforce fail ... unexpected pos]": the run ended as if the disk were full, and last.pt was not saved.
    (Handlers, not a signal mask: a process-directed signal goes to any thread that does not block it.)"""
    if threading.current_thread() is not threading.main_thread():  # only the main thread runs Python handlers
        yield
        return
    caught: list[tuple[int, Any]] = []
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: caught.append((signum, frame))) for s in stops}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        signum, frame = caught[0]
        handler = previous[signum]
        if callable(handler):
            handler(signum, frame)  # the run's own (TerminatedError, KeyboardInterrupt)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(signum)  # what the signal would have done: end the process


def _write(ckpt: dict[str, Any], path: Path, tmp: Path) -> None:
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())  # on the disk before the rename, so a power cut cannot leave an empty last.pt
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError ("unexpected pos ...")
        tmp.unlink(missing_ok=True)  # no partial file left taking the space
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
        except OSError:
            free = "its free space unknown"
        message = (f"cannot save {path} ({free}: a full disk?): {e}; "
                   f"{'the previous one is kept' if path.exists() else 'nothing was written'}")
        code = getattr(e, "errno", None)  # torch's RuntimeError has none: no '[Errno None]' before the message
        raise (OSError(code, message) if code is not None else OSError(message)) from e
    tmp.replace(path)  # atomic: a crash mid-write never leaves a torn last.pt


def _model_from_own(path: Path, raw: dict[str, Any]) -> DetectionModel:
    """Build our checkpoint's model from its spec, first checking the spec against the weights.

    A spec that disagrees with the weights (edited, or corrupt) is refused in one line naming what disagrees,
    never rebuilt from the weights alone: its class names could not be trusted, and wrong labels are worse than none.
    """
    fix = ("the file was edited or is corrupt: use the best.pt / last.pt its training run wrote, or save its 'model' "
           "entry alone as a plain state dict (class names then become class0..N-1)")
    state = raw.get("model")
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: this yolov12-serve checkpoint holds no weights (its 'model' entry is not a "
                              "state dict); use the weights/best.pt or last.pt its training run wrote")
    state = strip_ddp_prefix(state)
    spec = raw.get("spec")
    if not isinstance(spec, dict):
        raise CheckpointError(f"{path}: this yolov12-serve checkpoint has no 'spec' (variant, nc, class names); {fix}")
    try:
        variant, nc = _variant_of(state), _nc_of(state)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    names = spec.get("names")
    wrong = []
    if spec.get("variant") != variant:
        wrong.append(f"variant {spec.get('variant')!r} but the weights are {variant!r}")
    if spec.get("nc") != nc or isinstance(spec.get("nc"), bool):
        wrong.append(f"nc={spec.get('nc')!r} but the weights have {nc} classes")
    names_explained = wrong and isinstance(names, dict) and len(names) == spec.get("nc")  # the nc line said it
    if not names_explained and not (isinstance(names, dict) and all(isinstance(v, str) for v in names.values())
            and sorted(k for k in names if isinstance(k, int) and not isinstance(k, bool)) == list(range(nc))
            and len(names) == nc):
        shown = f"{len(names)} class names" if isinstance(names, dict | list | tuple) else f"names {names!r:.40}"
        wrong.append(f"{shown} but the weights have {nc} classes (names must map 0..{nc - 1} to text)")
    if wrong:
        raise CheckpointError(f"{path}: the checkpoint's spec disagrees with its weights: {'; '.join(wrong)}; {fix}")
    try:
        model = build_model(spec.get("yaml"), nc=nc, names={k: names[k] for k in range(nc)}, variant=variant)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: the checkpoint's spec holds no buildable architecture "
                              f"({e.__class__.__name__}: {e}); {fix}") from None
    bad = _shapes_match(model, state)
    if bad:
        raise CheckpointError(f"{path}: the checkpoint's spec (scale {spec.get('scale')!r}) disagrees with its "
                              f"weights: {len(bad)} tensors differ, first {bad[0]}; {fix}")
    model.load_state_dict(state)
    return model


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load our checkpoint or an official / ultralytics one; the model comes back in fp32, eval mode."""
    path = Path(path)
    if path.is_dir():  # a run's folder given for its weights: "not found" would send the operator hunting
        best = next((str(p) for p in (path / "best.pt", path / "weights" / "best.pt") if p.is_file()), None)
        raise CheckpointError(f"checkpoint '{path}' is a folder: give the .pt file in it" +
                              (f", e.g. {best}" if best else ""))
    if not path.is_file():  # ultralytics downloads yolo12n.pt by its name; nothing here reaches the network
        yaml = f"{path.stem}.yaml" if re.fullmatch(r"yolov?12[nsmlx](-v1)?", path.stem.lower()) else "yolov12n.yaml"
        raise CheckpointError(f"checkpoint '{path}' not found (weights are never downloaded here): give the path of "
                              f"a .pt file (ours, official YOLOv12 or ultralytics weights), or build a fresh model "
                              f"from '{yaml}'")
    try:
        raw = load_raw(path)
    except pickle.UnpicklingError as e:  # asks to run code
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # zip errors, truncated files
        raise CheckpointError(f"{path}: unreadable checkpoint ({e.__class__.__name__}: {e})") from None
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        model = _model_from_own(path, raw)
        meta = {k: v for k, v in raw.items() if k not in ("model", "ema", "optimizer", "scaler")}
        return Checkpoint(model.float().eval(), meta, raw, "yolov12-serve")
    if isinstance(raw, dict) and raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        return Checkpoint(model_from_state(raw), {}, raw, "state_dict")
    state, info = read_ultralytics(path, raw)
    model = model_from_state(state, info.get("names"), info.get("yaml"))
    imgsz = (info.get("train_args") or {}).get("imgsz")
    meta = {**info, "imgsz": imgsz if isinstance(imgsz, int) else 640}
    return Checkpoint(model, meta, {}, "ultralytics")
