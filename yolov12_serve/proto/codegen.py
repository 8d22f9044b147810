"""Regenerate the Python stubs from `protos/` with grpc_tools (a test-time dependency, imported lazily).

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

__all__ = ["PROTO_FILES", "PROTO_ROOT", "STUB_DIR", "generate"]

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_FILES = ("yolov12/v1/detector.proto",)
STUB_DIR = Path(__file__).resolve().parent / "yolov12" / "v1"
GRPC_FLOOR = "1.85.1"  # pyproject.toml: grpcio>=1.85.1


def generate(out_dir: Path = STUB_DIR, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Write `<name>_pb2.py`, `<name>_pb2_grpc.py` and a copy of each .proto into `out_dir`; return the paths."""
    try:
        from grpc_tools import protoc
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("grpcio-tools is needed to regenerate the stubs: pip install grpcio-tools") from e
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rel in PROTO_FILES:
            rc = protoc.main(["grpc_tools.protoc", f"-I{proto_root}", f"--python_out={tmp}",
                              f"--grpc_python_out={tmp}", str(proto_root / rel)])
            if rc != 0:
                raise RuntimeError(f"protoc failed ({rc}) on {proto_root / rel}")
            stem = Path(rel).with_suffix("")
            package = ".".join(stem.parent.parts)  # yolov12.v1
            for suffix in ("_pb2.py", "_pb2_grpc.py"):
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
