"""bench/gpu_check.py in its CPU --smoke mode: the GPU script must never rot between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_section(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    titles = " ".join(data)
    for section in ("0. environment", "1. correctness", "2. model speed", "3a. a global batch", "3. training memory",
                    "4. server on one GPU"):
        assert section in titles
    report = (tmp_path / "gpu_check.md").read_text()
    assert all(v is not None for v in data.values()), f"a section failed:\n{report[-4000:]}\n{out.stdout[-3000:]}"
    correctness = next(v for k, v in data.items() if k.startswith("1."))
    assert all(m["reference_dets"] > 0 for m in correctness.values()), "no detections: is tests/assets missing?"
    assert all(m["recall"] == 1.0 for m in correctness.values()), correctness  # CPU against itself: identical
    assert "FAILED" not in report, report[-4000:]
