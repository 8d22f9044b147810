"""Regenerate the Python stubs from `protos/` with grpc_tools (a test-time dependency, imported lazily).

Each .proto's stubs go beside its copy under this package, at its path in `protos/`: the public gRPC API
(messages and service) in yolov12/v1/, the Sparkplug B payload (messages only) in yolov12/sparkplug/.

Used by `scripts/gen_protos` and by the test that fails when the committed stubs are stale. The
generated gRPC module imports its messages as `yolov12.v1`; that line is rewritten to a relative
import so the stubs live inside this package without touching sys.path. The grpcio version the stubs
demand at import is pinned to the project's floor (pyproject's `grpcio>=`), not to whichever
grpcio-tools generated them: the stubs then come out the same from any tools release.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

__all__ = ["PACKAGE_DIR", "PROTO_FILES", "PROTO_ROOT", "STUB_DIR", "generate"]

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_FILES = ("yolov12/v1/detector.proto", "yolov12/sparkplug/sparkplug_b.proto")
GRPC_FILES = ("yolov12/v1/detector.proto",)  # those with a service: a _pb2_grpc module too
PACKAGE_DIR = Path(__file__).resolve().parent  # the stubs of protos/A/B.proto are PACKAGE_DIR/A/B_pb2.py
STUB_DIR = PACKAGE_DIR / "yolov12" / "v1"
GRPC_FLOOR = "1.85.1"  # pyproject.toml: grpcio>=1.85.1


def generate(out_root: Path = PACKAGE_DIR, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Write `<name>_pb2.py` (`<name>_pb2_grpc.py` for a service) and a copy of each .proto under `out_root`, at its
    folder in `protos/`; return the paths."""
    try:
        from grpc_tools import protoc
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("grpcio-tools is needed to regenerate the stubs: pip install grpcio-tools") from e
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rel in PROTO_FILES:
            grpc = rel in GRPC_FILES
            out_dir = Path(out_root) / Path(rel).parent
            out_dir.mkdir(parents=True, exist_ok=True)
            rc = protoc.main(["grpc_tools.protoc", f"-I{proto_root}", f"--python_out={tmp}",
                              *([f"--grpc_python_out={tmp}"] if grpc else []), str(proto_root / rel)])
            if rc != 0:
                raise RuntimeError(f"protoc failed ({rc}) on {proto_root / rel}")
            stem = Path(rel).with_suffix("")
            package = ".".join(stem.parent.parts)  # yolov12.v1
            for suffix in ("_pb2.py", "_pb2_grpc.py") if grpc else ("_pb2.py",):
                src = Path(tmp) / f"{stem}{suffix}"
                text = src.read_text().replace(f"from {package} import ", "from . import ")
                text = re.sub(r"GRPC_GENERATED_VERSION = '[^']*'", f"GRPC_GENERATED_VERSION = '{GRPC_FLOOR}'", text)
                dst = out_dir / src.name
                dst.write_text(text)
                written.append(dst)
            dst = out_dir / Path(rel).name
            shutil.copyfile(proto_root / rel, dst)
            written.append(dst)
    return written


if __name__ == "__main__":
    for path in generate():
        print(path)
