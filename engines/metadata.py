"""Read and write the metadata every engine file carries, without loading a session, a GPU or torch.

- ONNX: `metadata_props` (one JSON entry `yolov12_serve` holding EngineInfo, plus readable keys in
  ultralytics' conventions so their tools read our `--raw` exports). Read by walking the protobuf
  wire format of the top-level ModelProto, so neither the `onnx` package nor a session is needed.
- TensorRT: a 4-byte little-endian length, the JSON metadata, then the plan (ultralytics' layout).
- `.pt`: the checkpoint itself (torch imported lazily).

ultralytics' own ONNX exports and engines are understood too: their keys are mapped onto EngineInfo.
"""

from __future__ import annotations

import ast
import datetime
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import EngineError, EngineInfo, class_names

__all__ = ["ONNX_KEY", "check_file", "check_graph", "engine_header", "info_from_metadata", "info_to_props", "read_info",
           "read_onnx_props", "write_engine_file"]

ONNX_KEY = "yolov12_serve"  # the metadata_props entry holding EngineInfo as JSON
_HEADER_MAX = 16 << 20  # a metadata header is a few KB; anything larger is not one


# ----------------------------------------------------------------------------- ONNX metadata_props
def _varint(read: Any) -> int | None:
    """One base-128 varint from `read(1)`; None at a clean end of input."""
    value, shift = 0, 0
    while True:
        b = read(1)
        if not b:
            if shift:
                raise ValueError("truncated varint")
            return None
        value |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(f: Any, end: int, wanted: set[int]):
    """Yield (field, bytes) for length-delimited `wanted` fields of the message in f[tell():end]; skip the rest."""
    while f.tell() < end:
        key = _varint(f.read)
        if key is None:
            break
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ValueError("field number 0")
        if wire == 0:
            _varint(f.read)
            continue
        size = {1: 8, 5: 4}.get(wire)
        if size is None:
            if wire != 2:
                raise ValueError(f"unsupported wire type {wire}")
            size = _varint(f.read)
            if size is None:
                raise ValueError("truncated length")
        if f.tell() + size > end:
            raise ValueError("a field runs past the end of the file (truncated?)")
        if field in wanted and wire == 2:
            yield field, f.read(size)
        else:
            f.seek(size, 1)  # skip without reading: the graph's weights are most of the file


def read_onnx_props(path: str | Path) -> dict[str, str]:
    """`metadata_props` of an ONNX file as a dict, reading only the protobuf framing (no onnx, no session)."""
    path = Path(path)
    check_file(path)
    props: dict[str, str] = {}
    has_graph = False
    try:
        with open(path, "rb") as f:
            for field, value in _fields(f, path.stat().st_size, {7, 14}):
                if field == 7:  # ModelProto.graph
                    has_graph = True
                else:  # ModelProto.metadata_props: StringStringEntryProto {key = 1, value = 2}
                    entry = {k: v.decode("utf-8") for k, v in _fields(io.BytesIO(value), len(value), {1, 2})}
                    props[entry.get(1, "")] = entry.get(2, "")
    except (ValueError, UnicodeDecodeError) as e:
        raise EngineError(f"{path}: not a readable ONNX model ({e}): the file is corrupt or truncated; "
                          "export it again with yolov12-export") from None
    if not has_graph:
        raise EngineError(f"{path}: not an ONNX model (no graph inside): export one with "
                          "`yolov12-export --weights best.pt --format onnx`")
    return props


# ----------------------------------------------------------------------------- TensorRT header
def engine_header(path: str | Path) -> tuple[int, dict[str, Any]]:
    """(offset of the plan, metadata dict) of a TensorRT engine file; (0, {}) for a bare plan without a header."""
    path = Path(path)
    check_file(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(4), "little")
        if 0 < n <= min(size - 4, _HEADER_MAX):
            try:
                meta = json.loads(f.read(n).decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                return 0, {}
            if isinstance(meta, dict):
                return 4 + n, meta
    return 0, {}


def write_engine_file(path: str | Path, info: EngineInfo, plan: bytes | memoryview) -> Path:
    """Write `info` as the length-prefixed JSON header, then the serialized plan (atomically)."""
    path = Path(path)
    header = info.to_json().encode("utf-8")
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(header).to_bytes(4, "little"))
        f.write(header)
        f.write(plan)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- EngineInfo <-> metadata
def _literal(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def info_from_metadata(meta: dict[str, Any], source: str = "") -> EngineInfo:
    """EngineInfo from our metadata (the `yolov12_serve` JSON entry or a JSON header) or from ultralytics' keys;
    malformed metadata is one EngineError line naming the file, not a JSON or attribute traceback."""
    try:
        return _info_from_metadata(meta, source)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        kind = ONNX_KEY if ONNX_KEY in meta or "extra" in meta else "ultralytics"
        raise EngineError(f"{source or 'engine'}: corrupt {kind} metadata ({reason}): export the model again "
                          "with yolov12-export") from None


def _info_from_metadata(meta: dict[str, Any], source: str) -> EngineInfo:
    if ONNX_KEY in meta:
        return EngineInfo.from_json(meta[ONNX_KEY])
    if "precision" in meta and "extra" in meta:  # our TensorRT header: EngineInfo itself
        return EngineInfo.from_json(json.dumps(meta))
    if "names" not in meta or "imgsz" not in meta:
        raise EngineError(f"{source or 'engine'}: no model metadata (class names, input size) inside: "
                          "export it with yolov12-export (or ultralytics' exporter)")
    names = _literal(meta["names"])
    names = dict(enumerate(names)) if isinstance(names, list | tuple) else names
    imgsz = _literal(meta["imgsz"])
    imgsz = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    args = _literal(meta.get("args", {})) or {}
    dynamic = bool(args.get("dynamic", meta.get("dynamic", False)))
    batch = int(_literal(meta.get("batch", 1)) or 1)
    end2end = bool(_literal(meta.get("end2end", False)) or args.get("nms", False))
    precision = "int8" if args.get("int8") else "fp16" if args.get("half") else "fp32"
    return EngineInfo(
        names=class_names(names), imgsz=(int(imgsz[0]), int(imgsz[1])),
        stride=int(_literal(meta.get("stride", 32))),
        batch=(1, batch if batch > 1 else 32) if dynamic else (batch, batch),  # as ours: --dynamic alone is 1..32
        dynamic_hw=dynamic, precision=precision, conf=float(args.get("conf") or 0.25),
        iou=float(args.get("iou") or 0.7), max_det=int(args.get("max_det") or 300),
        version=f"ultralytics {meta.get('version', '')}".strip(),
        extra={"source": "ultralytics", "layout": "end2end" if end2end else "raw", "input": "float-nchw"},
    )


def check_graph(info: EngineInfo, source: str, input_shape: Sequence[Any], output_shape: Sequence[Any],
                nhwc: bool) -> None:
    """Refuse metadata the graph contradicts (EngineError, one line): a raw head's [B, 4+nc, N] output against the
    class names, a static input's H, W against imgsz. Dimensions that are not ints (symbolic, -1) are not checked;
    nor is the class count of an NMS-inside graph, whose [B, max_det, 6] output does not carry it."""
    fix = "the metadata was edited or is corrupt: export the model again with yolov12-export"
    if info.extra.get("layout", "end2end") == "raw" and len(output_shape) == 3:
        channels = output_shape[1]
        if isinstance(channels, int) and channels > 0 and channels != 4 + info.nc:
            raise EngineError(f"{source}: the metadata names {info.nc} classes of a raw head (output [B, "
                              f"{4 + info.nc}, N]) but the graph outputs {list(output_shape)}; {fix}")
    if len(input_shape) == 4:
        h, w = (input_shape[1], input_shape[2]) if nhwc else (input_shape[2], input_shape[3])
        if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0 and (h, w) != tuple(info.imgsz):
            raise EngineError(f"{source}: the graph takes {h}x{w} input but its metadata says imgsz "
                              f"{info.imgsz[0]}x{info.imgsz[1]}; {fix}")


def info_to_props(info: EngineInfo) -> dict[str, str]:
    """ONNX metadata_props for `info`: the JSON entry plus readable keys in ultralytics' conventions."""
    layout = info.extra.get("layout", "end2end")
    args = {"batch": info.batch[1], "dynamic": info.dynamic_hw, "half": info.precision == "fp16",
            "int8": info.precision == "int8", "imgsz": list(info.imgsz), "nms": False,
            "conf": info.conf, "iou": info.iou, "max_det": info.max_det}
    return {
        ONNX_KEY: info.to_json(),
        "description": f"YOLOv12-{info.scale or '?'} ({info.variant or '?'}) exported by yolov12-serve",
        "author": "yolov12-serve", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "version": info.version, "task": "detect", "stride": str(info.stride), "batch": str(info.batch[1]),
        "imgsz": str(list(info.imgsz)), "names": str(dict(info.names)), "args": str(args),
        "dynamic": str(info.dynamic_hw), "precision": info.precision, "variant": info.variant, "scale": info.scale,
        "conf": str(info.conf), "iou": str(info.iou), "max_det": str(info.max_det), "layout": layout,
    }


# ----------------------------------------------------------------------------- any file
def check_file(path: Path) -> None:
    """Raise EngineError with the fix when `path` is missing, a directory or empty."""
    if not path.exists():
        raise EngineError(f"engine file '{path}' not found: check the path, or export one with "
                          "`yolov12-export --weights best.pt --format onnx`")
    if not path.is_file():
        raise EngineError(f"'{path}' is a directory, not an engine file: give the engine file in it")
    if path.stat().st_size == 0:
        raise EngineError(f"engine file '{path}' is empty: export it again")


def read_info(path: str | Path) -> EngineInfo:
    """The metadata of an `.onnx`, `.engine`/`.plan` or `.pt` file, without creating a session or touching a GPU."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return info_from_metadata(read_onnx_props(path), str(path))
    if suffix in (".engine", ".plan"):
        _, meta = engine_header(path)
        if not meta:
            raise EngineError(f"{path}: no metadata header before the TensorRT plan: build it with "
                              "`yolov12-export --format engine` (or ultralytics' exporter)")
        return info_from_metadata(meta, str(path))
    if suffix in (".pt", ".pth"):
        from .pytorch import checkpoint_info

        return checkpoint_info(path)
    if path.is_dir():  # a models folder given for its file: its empty suffix read as an unknown format ''
        check_file(path)
    raise EngineError(f"'{path}': unknown engine format '{path.suffix}': use .onnx (ONNX Runtime), "
                      ".engine/.plan (TensorRT) or .pt (PyTorch)")
