"""The synthetic defect generator: deterministic, exact labels, balanced classes, a loadable dataset, torch-free."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from trainer.data.config import load_data_config
from trainer.data.labels import scan_split
from trainer.data.scene import CLASS_NAMES, draw_scene, plan_scene, render_scene
from trainer.data.synth import synth_main, synthesize


def test_render_scene_is_deterministic_per_seed():
    a = render_scene(np.random.default_rng(7), (180, 320))
    b = render_scene(np.random.default_rng(7), (180, 320))
    c = render_scene(np.random.default_rng(8), (180, 320))
    assert a[0].shape == (180, 320, 3) and a[0].dtype == np.uint8
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("seed", range(12))
def test_boxes_tightly_bound_what_was_drawn(seed):
    """Drawn with and without its defects, a frame differs exactly inside the boxes: every box edge touches a
    changed pixel, and nothing changed visibly outside the boxes (the camera blur spreads at most 1-2 px)."""
    plan = plan_scene(np.random.default_rng([seed, 99]), (240, 320))
    image, boxes, classes = draw_scene(plan)
    clean, _, _ = draw_scene(plan, defects=False)
    diff = np.abs(image.astype(int) - clean.astype(int)).max(-1)
    assert len(boxes) == len(classes) <= len(plan.defects)
    inside = np.zeros(diff.shape, bool)
    for x1, y1, x2, y2 in boxes.astype(int):
        assert 0 <= x1 < x2 <= 320 and 0 <= y1 < y2 <= 240
        changed = diff[y1:y2, x1:x2] >= 2
        rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
        # blur may fade a one-pixel-wide edge below the threshold: allow one pixel
        assert rows[0] <= 1 and rows[-1] >= y2 - y1 - 2, (seed, (x1, y1, x2, y2), rows[[0, -1]])
        assert cols[0] <= 1 and cols[-1] >= x2 - x1 - 2, (seed, (x1, y1, x2, y2), cols[[0, -1]])
        inside[max(0, y1 - 2):y2 + 2, max(0, x1 - 2):x2 + 2] = True
    assert diff[~inside].max(initial=0) <= 8, f"seed {seed}: visible change outside every box"


def test_classes_are_balanced_and_sizes_vary():
    counts: Counter = Counter()
    sides = []
    for i in range(60):
        _, boxes, classes = render_scene(np.random.default_rng([3, i]), (160, 160))
        counts.update(classes.tolist())
        sides += (boxes[:, 2:] - boxes[:, :2]).max(1).tolist()
    total = sum(counts.values())
    assert set(counts) == set(range(len(CLASS_NAMES)))
    assert min(counts.values()) >= 0.1 * total, counts
    assert min(sides) <= 12 and max(sides) >= 40  # some small, some large


def test_synthesize_writes_a_loadable_deterministic_dataset(tmp_path):
    a = synthesize(tmp_path / "a", images=10, imgsz=128, val_fraction=0.3, seed=5)
    b = synthesize(tmp_path / "b", images=10, imgsz=128, val_fraction=0.3, seed=5)
    cfg = load_data_config(a)
    assert cfg.names == dict(enumerate(CLASS_NAMES))
    assert len(cfg.images("train")) == 7 and len(cfg.images("val")) == 3
    shapes = set()
    for split in ("train", "val"):
        records, report = scan_split(cfg.images(split), cfg.nc, split)
        assert report.problems == 0, report.summary()
        shapes |= {r.shape for r in records}
        for image in cfg.images(split):
            twin = tmp_path / "b" / image.relative_to(tmp_path / "a")
            assert image.read_bytes() == twin.read_bytes()
            label = Path(str(image).replace("/images/", "/labels/")).with_suffix(".txt")
            assert label.read_text() == Path(str(twin).replace("/images/", "/labels/")).with_suffix(".txt").read_text()
    assert all(max(s) == 128 for s in shapes) and len(shapes) >= 2  # camera aspect ratios, long side imgsz
    assert b.exists()


def test_synthesize_replaces_its_own_output_and_refuses_foreign_folders(tmp_path):
    out = tmp_path / "ds"
    synthesize(out, images=6, imgsz=64)
    synthesize(out, images=3, imgsz=64, val_fraction=0.34)  # rerun: old images go
    assert len(list((out / "images").rglob("*.jpg"))) == 3
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        synthesize(foreign, images=2, imgsz=64)
    assert (foreign / "notes.txt").exists()
    with pytest.raises(ValueError, match="at least 1"):
        synthesize(tmp_path / "x", images=0)
    with pytest.raises(ValueError, match="no training image"):
        synthesize(tmp_path / "y", images=1, val_fraction=0.5)


def test_cli(tmp_path, capsys):
    assert synth_main(["--out", str(tmp_path / "cli"), "--images", "4", "--imgsz", "96x128", "--seed", "1"]) == 0
    assert "data.yaml" in capsys.readouterr().out
    cfg = load_data_config(tmp_path / "cli" / "data.yaml")
    assert len(cfg.images("train")) + len(cfg.images("val")) == 4
    assert synth_main(["synth", "--out", str(tmp_path / "bad"), "--images", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("yolov12-data synth: error: ") and "at least 1 image" in err, err


@pytest.mark.parametrize(("argv", "message"), [
    (["--images", "2", "--imgsz", "100000"], "each in 32..4096"),  # once tried to allocate 63 GiB
    (["--images", "2", "--imgsz", "16"], "each in 32..4096"),
    (["--images", "2", "--imgsz", "64x5000"], "each in 32..4096"),
    (["--images", "0"], "at least 1 image"),
    (["--images", "2", "--seed", "-1"], "seed=-1: give a whole number >= 0"),
])
def test_cli_checks_options_before_making_any_folder(tmp_path, capsys, argv, message):
    out = tmp_path / "new"
    assert synth_main(["--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("yolov12-data synth: error: ") and message in err, err
    assert not out.exists()


def test_cli_unwritable_out_is_one_line(tmp_path, capsys):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert synth_main(["--out", str(blocked / "x"), "--images", "2", "--imgsz", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {blocked / 'x'}: cannot create the folder" in err, err


def test_an_interrupted_run_can_be_run_again(tmp_path, monkeypatch):
    """A run that dies half-way leaves a folder the next run recognises as its own, and no loadable dataset."""
    import trainer.data.synth as synth

    def broken(rng, hw):
        raise MemoryError("drawing failed")

    out = tmp_path / "ds"
    with monkeypatch.context() as m:
        m.setattr(synth, "render_scene", broken)
        with pytest.raises(MemoryError):
            synthesize(out, images=3, imgsz=64)
    with pytest.raises(ValueError, match="unfinished `yolov12-data synth` run; run it again"):
        load_data_config(out / "data.yaml")
    path = synthesize(out, images=3, imgsz=64, val_fraction=0.34)
    cfg = load_data_config(path)
    assert len(cfg.images("train")) + len(cfg.images("val")) == 3


def test_renderer_imports_without_torch_or_opencv():
    code = ("import sys, numpy as np; from trainer.data.synth import render_scene; "
            "render_scene(np.random.default_rng(0), (64, 96)); "
            "bad = [m for m in ('torch', 'cv2') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
