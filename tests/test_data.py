"""trainer.data: data.yaml errors, label checks, augmentation exactness, rect batches, determinism, sharding, caches."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from trainer.data.augment import CopyPaste, MixUp, default_hyp, scale_defaults
from trainer.data.config import DataError, load_data_config
from trainer.data.dataset import DetectionDataset
from trainer.data.labels import LabelReport, parse_label_file, scan_split
from trainer.data.loader import build_dataloader

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 255, 255), (255, 0, 255), (255, 255, 0)]
NAMES = "names: [red, green, blue, cyan, magenta, yellow]\n"


def _write_yaml(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "data.yaml"
    path.write_text(text)
    return path


def _colour_dataset(root: Path, sizes: list[tuple[int, int]], seed: int = 0) -> Path:
    """Images of grey (114) with solid rectangles of class colours (6 px apart and from the border), labelled
    exactly; returns data.yaml."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        img = np.full((h, w, 3), 114, np.uint8)
        placed: list[tuple[int, int, int, int]] = []
        rows = []
        for _ in range(40):
            if len(placed) == 4:
                break
            bw, bh = (int(v) for v in rng.integers(14, max(15, min(h, w) // 3), 2))
            x, y = int(rng.integers(6, w - bw - 6)), int(rng.integers(6, h - bh - 6))  # apart across mosaic seams
            if any(x < px2 + 6 and px < x + bw + 6 and y < py2 + 6 and py < y + bh + 6 for px, py, px2, py2 in placed):
                continue
            c = len(placed) % len(COLOURS) if i % 2 else (len(placed) + 3) % len(COLOURS)
            img[y:y + bh, x:x + bw] = COLOURS[c]
            placed.append((x, y, x + bw, y + bh))
            rows.append(f"{c} {(x + bw / 2) / w} {(y + bh / 2) / h} {bw / w} {bh / h}")
        split = "val" if i % 4 == 3 else "train"
        Image.fromarray(img).save(root / "images" / split / f"{i:03d}.png")
        (root / "labels" / split / f"{i:03d}.txt").write_text("\n".join(rows) + "\n")
    return _write_yaml(root, f"path: {root}\ntrain: images/train\nval: images/val\n{NAMES}")


@pytest.fixture(scope="module")
def colour_yaml(tmp_path_factory) -> Path:
    sizes = [(160, 160), (120, 200), (200, 120), (150, 180), (180, 140), (100, 200), (160, 160), (140, 200)] * 2
    return _colour_dataset(tmp_path_factory.mktemp("colour"), sizes)


# ------------------------------------------------------------------------------------------------ data.yaml
def test_config_errors_are_one_clear_message_each(tmp_path):
    (tmp_path / "images" / "val").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "val" / "a.png")
    missing = _write_yaml(tmp_path, f"path: {tmp_path}\ntrain: images/train\nval: images/val\n{NAMES}")
    with pytest.raises(DataError, match=r"'train: images/train' does not exist .*create it or fix the path"):
        load_data_config(missing)
    (tmp_path / "images" / "train").mkdir()
    with pytest.raises(DataError, match=r"split 'train' is empty.*put images there"):
        load_data_config(missing)
    no_names = _write_yaml(tmp_path / "n", f"path: {tmp_path}\ntrain: images/val\nval: images/val\n")
    with pytest.raises(DataError, match=r"no class 'names'; add e.g."):
        load_data_config(no_names)
    no_val = _write_yaml(tmp_path / "v", f"path: {tmp_path}\ntrain: images/val\n{NAMES}")
    with pytest.raises(DataError, match=r"no 'val' entry"):
        load_data_config(no_val)
    with pytest.raises(DataError, match=r"data\.yaml not found"):
        load_data_config(tmp_path / "nope.yaml")
    bad_ids = _write_yaml(tmp_path / "b", f"path: {tmp_path}\ntrain: images/val\nval: images/val\n"
                                          "names: {0: a, 2: b}\n")
    with pytest.raises(DataError, match="without gaps"):
        load_data_config(bad_ids)
    bad_nc = _write_yaml(tmp_path / "c", f"path: {tmp_path}\ntrain: images/val\nval: images/val\nnc: 7\n"
                                         "names: [scratch, dent]\n")
    with pytest.raises(DataError, match=r"'nc: 7' but 'names' lists 2 classes \(scratch, dent\); make them agree"):
        load_data_config(bad_nc)
    for text, where in (("names: [a, b\n", "line 2, column 1"), ("train: images/val\n\tval: x\n", "line 2, column 1")):
        broken = _write_yaml(tmp_path / f"y{len(text)}", text)  # one line, saying where: not PyYAML's caret drawing
        with pytest.raises(DataError, match=f"not valid YAML at {where} \\(") as e:
            load_data_config(broken)
        assert "\n" not in str(e.value), str(e.value)


def test_config_resolves_folders_lists_and_relative_paths(tmp_path):
    root = tmp_path / "ds"
    for name in ("a", "b", "c"):
        (root / "images" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(root / "images" / name / f"{name}.jpg")
    (root / "extra.txt").write_text("images/c/c.jpg\n# a comment\n\n")
    cfg_dir = tmp_path / "cfg"
    (cfg_dir / "local").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(cfg_dir / "local" / "l.png")
    # 'path' relative to the yaml; 'local' only exists beside the yaml (the second place looked in)
    path = _write_yaml(cfg_dir, "path: ../ds\ntrain: [images/a, extra.txt, local]\nval: images/b\n"
                                "names: {0: x, 1: y}\n")
    cfg = load_data_config(path)
    assert cfg.root == root.resolve() and cfg.names == {0: "x", 1: "y"} and cfg.nc == 2
    assert {p.name for p in cfg.images("train")} == {"a.jpg", "c.jpg", "l.png"}
    assert [p.name for p in cfg.images("val")] == ["b.jpg"]
    with pytest.raises(DataError, match="no 'test' split"):
        cfg.images("test")


# --------------------------------------------------------------------------------------------------- labels
def test_every_bad_row_is_reported_with_file_and_line_and_good_rows_are_kept(tmp_path):
    label = tmp_path / "labels" / "x.txt"
    label.parent.mkdir()
    label.write_text(
        "0 0.5 0.5 0.2 0.2\n"          # 1 good
        "7 0.5 0.5 0.2 0.2\n"          # 2 class out of range (nc=3)
        "1.5 0.5 0.5 0.2 0.2\n"        # 3 class not an integer
        "0 0.5 0.5 0.2\n"              # 4 wrong column count
        "0 a 0.5 0.2 0.2\n"            # 5 not a number
        "0 1.5 0.5 0.2 0.2\n"          # 6 out of bounds
        "0 0.5 0.5 0 0.2\n"            # 7 non-positive size
        "0 0.5 0.5 0.2 0.2\n"          # 8 duplicate of line 1
        "2 0.995 0.5 0.02 0.1\n"       # 9 overshoots by 0.005: clipped, kept
        "\n"                           # 10 blank: ignored
        "1 0.1 0.1 0.3 0.1 0.3 0.3\n"  # 11 polygon: its bounding box, kept
        "0 nan 0.5 0.2 0.2\n"          # 12 not a number
        "1 0.9 0.1 1.004 0.1 1.004 0.3\n"  # 13 polygon overshooting by 0.004: clipped (counted), kept
    )
    report = LabelReport(max_lines=50)
    cls, boxes = parse_label_file(label, nc=3, report=report)
    assert cls.tolist() == [0, 2, 1, 1]
    np.testing.assert_allclose(boxes, [[0.5, 0.5, 0.2, 0.2], [0.9925, 0.5, 0.015, 0.1], [0.2, 0.2, 0.2, 0.2],
                                       [0.95, 0.2, 0.1, 0.2]], atol=1e-6)
    expected = {2: "class out of range", 3: "class not an integer", 4: "wrong column count", 5: "not a number",
                6: "out of bounds", 7: "non-positive size", 8: "duplicate row", 9: "clipped", 12: "not a number",
                13: "clipped"}
    assert dict(report.counts) == {k: list(expected.values()).count(k) for k in set(expected.values())}
    for line, kind in expected.items():
        assert any(msg.startswith(f"{label}:{line}: ") for msg in report.lines), (line, kind, report.lines)
    summary = report.summary()
    assert "out of bounds: 1" in summary and f"{label}:2:" in summary


def test_scan_skips_corrupt_and_missing_images_and_treats_missing_labels_as_background(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (40, 30)).save(images / "good.jpg")
    (tmp_path / "labels" / "good.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    Image.new("RGB", (40, 30)).save(images / "background.png")  # no label file
    (images / "garbage.png").write_bytes(b"not an image at all")
    noise = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(noise).save(images / "cut.jpg")
    (images / "cut.jpg").write_bytes((images / "cut.jpg").read_bytes()[:-100])  # a download cut short
    (images / "trailer.jpg").write_bytes((images / "good.jpg").read_bytes() + b"\0" * 16)  # camera trailer: fine
    (images / "binary.png").write_bytes((images / "good.jpg").read_bytes())  # fine: content decides, not suffix
    (tmp_path / "labels" / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    files = sorted(images.iterdir()) + [images / "gone.jpg"]
    records, report = scan_split(files, nc=2, split="train")
    assert sorted(Path(r.im_file).name for r in records) == ["background.png", "good.jpg", "trailer.jpg"]
    good = next(r for r in records if r.im_file.endswith("good.jpg"))
    assert good.shape == (30, 40) and good.cls.tolist() == [1]
    assert report.counts == {"corrupt image": 2, "missing image": 1, "unreadable label file": 1}
    assert report.images_found == 7 and report.images_used == 3 and report.backgrounds == 2
    assert any("cut.jpg: truncated JPEG" in line for line in report.lines)
    assert any("gone.jpg: listed but does not exist" in line for line in report.lines)


def test_an_image_with_a_bad_label_row_is_skipped_whole_and_nothing_left_fails_clearly(tmp_path):
    """A skipped row would leave its object in the image as background: the whole image goes (as ultralytics),
    named with file:line and counted; duplicates and clipped rows keep their image."""
    yaml_path = _colour_dataset(tmp_path / "ds", [(64, 64)] * 4)
    labels = tmp_path / "ds" / "labels" / "train"
    (labels / "000.txt").write_text((labels / "000.txt").read_text() + "9 0.5 0.5 0.1 0.1\n")
    first = (labels / "001.txt").read_text().splitlines()[0]
    (labels / "001.txt").write_text((labels / "001.txt").read_text() + f"{first}\n")  # a duplicate: image kept
    (tmp_path / "ds" / "images" / "train" / "zzz.png").write_bytes(b"broken")
    ds = DetectionDataset(load_data_config(yaml_path), "train", imgsz=64)
    assert len(ds) == 2 and not any(r.im_file.endswith("000.png") for r in ds.records)
    assert ds.report.counts == {"class out of range": 1, "corrupt image": 1, "duplicate row": 1}
    assert ds.report.bad_label_images == 1 and "1 skipped for bad label rows" in ds.report.summary()
    assert any(line.startswith(f"{labels / '000.txt'}:") and line.endswith("image skipped") for line in ds.report.lines)
    assert ds[0]["cls"].shape[1] == 1
    for f in (tmp_path / "ds" / "images" / "val").iterdir():
        f.write_bytes(b"broken")
    with pytest.raises(DataError, match="split 'val' has no usable images"):
        DetectionDataset(load_data_config(yaml_path), "val", imgsz=64)


def test_missing_label_files_are_counted_apart_from_empty_ones_and_warned(tmp_path):
    images, labels = tmp_path / "images" / "train", tmp_path / "labels" / "train"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for name in ("boxed", "empty", "unlabelled"):
        Image.new("RGB", (40, 30)).save(images / f"{name}.png")
    (labels / "boxed.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    (labels / "empty.txt").write_text("")
    _, report = scan_split(sorted(images.iterdir()), nc=2, split="train")
    assert (report.backgrounds, report.no_label_file, report.boxes_used) == (2, 1, 1)
    lines = report.summary().splitlines()
    assert lines[0] == ("train: 3/3 images used (2 without objects, 1 of them with no label file), 1 boxes, "
                        "no label problems")
    assert lines[1] == (f"WARNING train: 1 of 3 images have no label file (looked for {labels / '*.txt'}: images/ -> "
                        "labels/, as ultralytics); they train as backgrounds")
    assert report.needs_attention
    _, none = scan_split([images / "unlabelled.png", images / "empty.png"][:1], nc=2, split="train")
    assert none.no_boxes_message() == (f"no labels found for any of 1 train images: looked for {labels / '*.txt'} "
                                       "(images/ -> labels/, as ultralytics); put the YOLO .txt label files there or "
                                       "fix the folder names")


def _labelled(root: Path, files: dict[str, Image.Image], exif: dict[str, int] | None = None) -> Path:
    """A dataset whose train and val splits hold `files` (name -> image, saved with an EXIF orientation where given),
    each labelled with one centred box; returns data.yaml."""
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for name, im in files.items():
            extra = {}
            if exif and name in exif:
                tags = Image.Exif()
                tags[274] = exif[name]
                extra["exif"] = tags
            if name.endswith(".webp"):
                extra["lossless"] = True
            im.save(root / "images" / split / name, **extra)
            (root / "labels" / split / f"{Path(name).stem}.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    return _write_yaml(root, f"path: {root}\ntrain: images/train\nval: images/val\n{NAMES}")


def _corner_image(w: int = 60, h: int = 40) -> Image.Image:
    """An image whose orientation shows: a red top-left and a blue bottom-right block on grey."""
    a = np.full((h, w, 3), 114, np.uint8)
    a[: h // 4, : w // 3] = (255, 0, 0)
    a[-h // 4:, -w // 6:] = (0, 0, 255)
    return Image.fromarray(a)


def test_exif_orientation_gives_the_same_shape_and_pixels_in_every_format(tmp_path):
    """The recorded shape (rect batches, ratio_pad) and the decoded pixels agree with PIL's exif_transpose (what
    serving shows the model) for every orientation of JPEG, PNG, WebP and TIFF. OpenCV itself rotates JPEG, PNG and
    WebP, and fails on a quarter-turned TIFF ('Internal imread issue')."""
    files = {f"o{o}.{ext}": _corner_image() for ext in ("jpg", "png", "webp", "tif") for o in range(1, 9)}
    yaml_path = _labelled(tmp_path / "ds", files, {name: int(name[1]) for name in files})
    ds = DetectionDataset(load_data_config(yaml_path), "train", imgsz=64)
    assert len(ds) == len(files) and not ds.report.counts
    for i, record in enumerate(ds.records):
        expected = np.asarray(ImageOps.exif_transpose(Image.open(record.im_file)).convert("RGB")).astype(int)
        img = ds._read(i)
        assert record.shape == img.shape[:2] == expected.shape[:2], (record.im_file, record.shape, img.shape)
        assert np.abs(img.astype(int) - expected).mean() < 4, record.im_file
    rect = DetectionDataset(load_data_config(yaml_path), "val", imgsz=64, rect=True, batch_size=1)
    quarter = [i for i, r in enumerate(rect.records) if r.orientation in (5, 6, 7, 8)]
    assert all(rect[i]["img"].shape[1] > rect[i]["img"].shape[2] for i in quarter)  # upright: taller than wide


def test_images_opencv_cannot_decode_are_read_like_the_scan_saw_them(tmp_path):
    """A TIFF with an EXIF orientation passes the scan but OpenCV 5.1 cannot decode it: it trains (Pillow decodes it),
    with no 'changed or removed since' crash mid-epoch, in the RAM cache too."""
    yaml_path = _labelled(tmp_path / "ds", {"scan.tif": _corner_image(128, 64), "plain.png": _corner_image()},
                          {"scan.tif": 6})
    for cache in (False, "ram"):
        ds = DetectionDataset(load_data_config(yaml_path), "train", imgsz=64, cache=cache)
        i = next(i for i, r in enumerate(ds.records) if r.im_file.endswith("scan.tif"))
        assert ds.records[i].shape == (128, 64) and ds.load(i)["img"].shape == (64, 32, 3) and len(ds[i]["cls"]) == 1
        assert tuple(ds._read(i)[0, -1]) == (255, 0, 0)  # top-left red block turned to the top-right


def test_images_deeper_than_8_bits_are_skipped_as_serving_refuses_them(tmp_path):
    """16-bit PNG/TIFF and 32-bit float TIFF: serving refuses them ('more than 8 bits a channel'), so the scan skips
    them, counted and named, with the same advice (OpenCV would train on a /256 copy, or not read the float)."""
    rng = np.random.default_rng(0)
    deep = {"s16.png": Image.fromarray((rng.random((48, 64)) * 65535).astype(np.uint16)),
            "g16.tif": Image.fromarray((rng.random((48, 64)) * 65535).astype(np.uint16)),
            "f32.tif": Image.fromarray(rng.random((48, 64)).astype(np.float32)),
            "ok.png": _corner_image()}
    yaml_path = _labelled(tmp_path / "ds", deep)
    ds = DetectionDataset(load_data_config(yaml_path), "train", imgsz=64)
    assert [Path(r.im_file).name for r in ds.records] == ["ok.png"]
    assert ds.report.counts == {"more than 8 bits": 3}
    for name in ("s16.png", "g16.tif", "f32.tif"):
        assert any(line.startswith(str(tmp_path / "ds" / "images" / "train" / name)) and "(more than 8 bits a "
                   "channel): convert it to 8-bit RGB" in line for line in ds.report.lines), (name, ds.report.lines)


# ------------------------------------------------------------------------------------------- augmentation
def _assert_boxes_tightly_cover_their_colour(img: np.ndarray, boxes: np.ndarray, cls: np.ndarray) -> None:
    H, W = img.shape[:2]
    for (x1, y1, x2, y2), c in zip(boxes.tolist(), cls.astype(int).tolist()):
        X1, Y1 = max(0, math.floor(x1) - 2), max(0, math.floor(y1) - 2)
        X2, Y2 = min(W, math.ceil(x2) + 2), min(H, math.ceil(y2) + 2)
        match = np.abs(img[Y1:Y2, X1:X2].astype(int) - COLOURS[c]).max(-1) < 60  # more than half covered
        rows, cols = np.flatnonzero(match.any(1)), np.flatnonzero(match.any(0))
        assert len(rows), f"box {(x1, y1, x2, y2)} of class {c} holds none of its colour"
        got = (X1 + cols[0], Y1 + rows[0], X1 + cols[-1] + 1, Y1 + rows[-1] + 1)
        np.testing.assert_allclose(got, (x1, y1, x2, y2), atol=1.5, err_msg=f"class {c}")


def test_augmented_boxes_stay_exact_with_the_pixels(colour_yaml):
    # colours must survive, so no HSV and no blending; copy-paste is checked on its own below
    hyp = {**default_hyp("n"), "hsv_h": 0, "hsv_s": 0, "hsv_v": 0, "copy_paste": 0, "mixup": 0}
    ds = DetectionDataset(load_data_config(colour_yaml), "train", imgsz=160, augment=True, hyp=hyp, seed=1)
    boxes_seen = 0
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            img = item["img"].permute(1, 2, 0).numpy()
            assert img.shape == (160, 160, 3)
            cxcywh = item["bboxes"].numpy() * 160
            xyxy = np.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], 1)
            _assert_boxes_tightly_cover_their_colour(img, xyxy, item["cls"].numpy()[:, 0])
            boxes_seen += len(xyxy)
    assert boxes_seen > 3 * len(ds) * 3  # mosaics carry boxes of four images


def test_copy_paste_pastes_mirrored_boxes_only_where_free():
    img = np.full((40, 100, 3), 114, np.uint8)
    img[10:20, 5:25] = COLOURS[0]      # its mirror (75..95) is free
    img[10:30, 40:55] = COLOURS[1]     # its mirror (45..60) overlaps itself
    boxes = np.array([[5, 10, 25, 20], [40, 10, 55, 30]], np.float32)
    out = CopyPaste(p=1.0)({"img": img, "boxes": boxes, "cls": np.array([0, 1]), "rng": np.random.default_rng(0)})
    assert out["cls"].tolist() == [0, 1, 0]
    np.testing.assert_allclose(out["boxes"][2], [75, 10, 95, 20])
    _assert_boxes_tightly_cover_their_colour(out["img"], out["boxes"], out["cls"])
    assert (img[10:20, 75:95] == 114).all()  # the input image is not written to


def test_mixup_blends_two_samples_and_keeps_both_label_sets():
    a = {"img": np.full((8, 8, 3), 200, np.uint8), "boxes": np.ones((1, 4), np.float32), "cls": np.array([0]),
         "rng": np.random.default_rng(0)}
    b = {"img": np.full((8, 8, 3), 100, np.uint8), "boxes": np.zeros((2, 4), np.float32), "cls": np.array([1, 2])}
    out = MixUp(lambda rng: b, p=1.0)(a)
    assert out["cls"].tolist() == [0, 1, 2] and len(out["boxes"]) == 3
    assert 140 <= int(out["img"][0, 0, 0]) <= 160  # Beta(32, 32) weights stay near one half


def test_scale_defaults_follow_the_recipe():
    assert scale_defaults("n") == {"scale": 0.5, "mixup": 0.0, "copy_paste": 0.1}
    assert scale_defaults("x") == {"scale": 0.9, "mixup": 0.2, "copy_paste": 0.6}
    hyp = default_hyp("m")
    assert [hyp[k] for k in ("mixup", "copy_paste", "hsv_s", "fliplr", "translate")] == [0.15, 0.4, 0.7, 0.5, 0.1]
    with pytest.raises(ValueError, match="expected one of n, s, m, l, x"):
        scale_defaults("q")


def test_close_mosaic_switches_to_single_images(colour_yaml):
    ds = DetectionDataset(load_data_config(colour_yaml), "train", imgsz=160, augment=True, hyp=default_hyp("n"))
    per_image = [len(r.cls) for r in ds.records]
    mosaic = [len(ds[i]["cls"]) for i in range(len(ds))]
    ds.close_mosaic()
    assert ds.mosaic_closed
    single = [len(ds[i]["cls"]) for i in range(len(ds))]
    assert all(n <= m for n, m in zip(single, per_image))
    assert sum(mosaic) > sum(per_image)


# -------------------------------------------------------------------------------------- rectangular batches
def test_rect_val_batches_pad_only_to_their_largest_image(tmp_path):
    sizes = [(100, 200), (200, 100), (150, 150), (90, 160), (160, 90), (120, 160), (160, 120), (60, 200), (200, 60),
             (80, 200)]
    yaml_path = _colour_dataset(tmp_path / "r", sizes)
    cfg = load_data_config(yaml_path)
    for pad in (0.0, 0.5):
        ds = DetectionDataset(cfg, "train", imgsz=128, rect=True, batch_size=3, pad=pad)
        loader = build_dataloader(ds, batch_size=3, workers=0, shuffle=False)
        aspects, non_square = [], 0
        for batch in loader:
            H, W = batch["img"].shape[2:]
            assert H % 32 == 0 and W % 32 == 0
            fitted = []
            for (h0, w0), ((gh, gw), (pw, ph)) in zip(batch["ori_shape"], batch["ratio_pad"]):
                r = 128 / max(h0, w0)
                fitted.append((min(math.ceil(h0 * r), 128), min(math.ceil(w0 * r), 128)))
                aspects.append(h0 / w0)
                assert pw >= 0 and ph >= 0 and gh == pytest.approx(gw, rel=0.02)
            max_h, max_w = max(f[0] for f in fitted), max(f[1] for f in fitted)
            assert max_h <= H < max_h + 32 * (1 + pad) and max_w <= W < max_w + 32 * (1 + pad)
            non_square += (H, W) != (128, 128)
        assert aspects == sorted(aspects) and non_square >= 2


def test_ratio_pad_maps_eval_boxes_back_to_the_original_labels(colour_yaml):
    cfg = load_data_config(colour_yaml)
    ds = DetectionDataset(cfg, "train", imgsz=96, rect=True, batch_size=4)
    batch = next(iter(build_dataloader(ds, batch_size=4, workers=0, shuffle=False)))
    H, W = batch["img"].shape[2:]
    for i, ((h0, w0), ((gh, gw), (pw, ph))) in enumerate(zip(batch["ori_shape"], batch["ratio_pad"])):
        b = batch["bboxes"][batch["batch_idx"] == i].numpy() * [W, H, W, H]
        x1 = (b[:, 0] - b[:, 2] / 2 - pw) / gw
        y1 = (b[:, 1] - b[:, 3] / 2 - ph) / gh
        record = next(r for r in ds.records if r.im_file == batch["im_file"][i])
        np.testing.assert_allclose(x1, (record.boxes[:, 0] - record.boxes[:, 2] / 2) * w0, atol=0.6)
        np.testing.assert_allclose(y1, (record.boxes[:, 1] - record.boxes[:, 3] / 2) * h0, atol=0.6)


# ----------------------------------------------------------------------------------- determinism, sharding
def _first_batch(loader, epoch: int) -> dict:
    loader.set_epoch(epoch)
    return next(iter(loader))


def _same(a: dict, b: dict) -> bool:
    return a["im_file"] == b["im_file"] and all(torch.equal(a[k], b[k]) for k in ("img", "cls", "bboxes", "batch_idx"))


def test_same_seed_and_epoch_give_the_same_batch_with_any_worker_count(colour_yaml):
    cfg = load_data_config(colour_yaml)

    def loader(workers: int):
        ds = DetectionDataset(cfg, "train", imgsz=128, augment=True, hyp=default_hyp("s"), seed=3, batch_size=4)
        return build_dataloader(ds, batch_size=4, workers=workers, shuffle=True, seed=3)

    a, b, parallel = loader(0), loader(0), loader(2)
    first = _first_batch(a, 1)
    assert first["img"].shape == (4, 3, 128, 128) and first["img"].dtype == torch.uint8
    assert _same(first, _first_batch(b, 1))
    assert not _same(first, _first_batch(a, 2))
    assert not _same(_first_batch(parallel, 0), first)
    assert _same(_first_batch(parallel, 1), first)  # the epoch reaches the persistent workers
    clone = pickle.loads(pickle.dumps(a.dataset))  # what a 'spawn' worker receives
    assert clone.epoch == 2 and torch.equal(clone[5]["img"], a.dataset[5]["img"])


def test_two_ranks_see_disjoint_halves(colour_yaml):
    ds = DetectionDataset(load_data_config(colour_yaml), "train", imgsz=64)
    seen = []
    for rank in (0, 1):
        loader = build_dataloader(ds, batch_size=2, workers=0, shuffle=True, rank=rank, world_size=2, seed=0)
        loader.set_epoch(4)
        seen.append([f for batch in loader for f in batch["im_file"]])
    assert len(seen[0]) == len(seen[1]) == len(ds) // 2
    assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == {r.im_file for r in ds.records}
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        build_dataloader(ds, batch_size=2, workers=0, shuffle=True, rank=2, world_size=2)


# ------------------------------------------------------------------------------------------------- caches
def test_ram_and_disk_caches_give_the_same_samples(colour_yaml):
    cfg = load_data_config(colour_yaml)
    kwargs = {"imgsz": 128, "augment": True, "hyp": default_hyp("n"), "seed": 5}
    plain = DetectionDataset(cfg, "val", **kwargs)
    ram = DetectionDataset(cfg, "val", cache="ram", **kwargs)
    disk = DetectionDataset(cfg, "val", cache="disk", **kwargs)
    npys = sorted(Path(colour_yaml).parent.glob("images/val/*.rgb.npy"))
    assert len(npys) == len(disk)
    stamps = [p.stat().st_mtime_ns for p in npys]
    again = DetectionDataset(cfg, "val", cache="disk", **kwargs)  # reuses, does not rewrite
    assert [p.stat().st_mtime_ns for p in npys] == stamps
    for i in range(len(plain)):
        ref = plain[i]
        for other in (ram, disk, again):
            assert torch.equal(other[i]["img"], ref["img"]) and torch.equal(other[i]["bboxes"], ref["bboxes"])
    with pytest.raises(ValueError, match="cache='yes'"):
        DetectionDataset(cfg, "val", cache="yes")


def test_disk_cache_keeps_images_of_the_same_stem_apart(tmp_path):
    """x.jpg and x.png in one folder get their own cache file (x.jpg.rgb.npy, x.png.rgb.npy): one never trains on
    the other's pixels."""
    yaml_path = _labelled(tmp_path / "ds", {"pair.jpg": Image.new("RGB", (96, 48), (255, 0, 0)),
                                            "pair.png": Image.new("RGB", (48, 96), (0, 0, 255))})
    ds = DetectionDataset(load_data_config(yaml_path), "train", imgsz=96, cache="disk")
    assert sorted(p.name for p in (tmp_path / "ds" / "images" / "train").glob("*.npy")) == ["pair.jpg.rgb.npy",
                                                                                            "pair.png.rgb.npy"]
    for i, record in enumerate(ds.records):
        img = ds._read(i)
        colour = (0, 0, 255) if record.im_file.endswith(".png") else (255, 0, 0)
        assert img.shape[:2] == record.shape and np.abs(img.reshape(-1, 3).mean(0) - colour).max() < 3, record
