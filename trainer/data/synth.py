"""Synthetic factory-defect dataset: `yolov12-data synth --out DIR --images N` or `synthesize(DIR, images=N)`.

Frames of textured parts (brushed metal, woven fabric, circuit boards) on a conveyor belt, at camera-like
aspect ratios (16:9, 4:3, square), with uneven lighting, sensor noise and some blur, carrying defects of
five classes (scratch, dent, crack, stain, missing_part), several per frame, some small, with exact labels:
each box is the bounding box of the pixels its defect changed. Image i depends only on (seed, i), so a
dataset is the same on every run and machine. Writes the YOLO layout:

    DIR/data.yaml  DIR/images/{train,val}/000000.jpg  DIR/labels/{train,val}/000000.txt

`render_scene(rng, hw)` draws one frame (the server's demo cameras use it); this module imports neither
torch nor OpenCV.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from .. import __version__
from .scene import CLASS_NAMES, render_scene

__all__ = ["ASPECTS", "CLASS_NAMES", "frame_size", "render_scene", "synth_main", "synthesize"]

ASPECTS = ((1, 1), (3, 4), (9, 16))  # h : w of a square, a 4:3 and a 16:9 camera
GENERATOR_TAG = "yolov12-data synth"
JPEG_QUALITY = 95


def frame_size(imgsz: int | tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
    """(h, w) of the next frame: `imgsz` as given when it is (h, w); else a random camera aspect, long side imgsz."""
    if not isinstance(imgsz, int):
        return int(imgsz[0]), int(imgsz[1])
    ah, aw = ASPECTS[rng.integers(len(ASPECTS))]
    return max(32, round(imgsz * ah / aw / 2) * 2), imgsz


def synthesize(out_dir: str | Path, images: int = 200, imgsz: int | tuple[int, int] = 640, val_fraction: float = 0.2,
               seed: int = 0, progress: bool = False) -> Path:
    """Write a synthetic defect dataset to `out_dir` and return its data.yaml path.

    `out_dir` must be empty, new, or an earlier output of this generator (then it is replaced).
    """
    n_val, n_train = _split_sizes(images, val_fraction)  # every option is checked before any folder is made
    _check_imgsz(imgsz)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed={seed!r}: give a whole number >= 0")
    out = Path(out_dir).expanduser().resolve()
    _prepare(out)
    # tagged at once: a run that stops half-way (Ctrl-C, a full disk) leaves a folder the next run may replace
    (out / "data.yaml").write_text(f"# An unfinished `{GENERATOR_TAG}` run: run it again to regenerate.\n"
                                   + yaml.safe_dump({"generator": GENERATOR_TAG, "complete": False}))
    val_ids = set(np.random.default_rng([seed, 1]).permutation(images)[:n_val].tolist())
    for split in ("train", "val"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    for i in _progress(range(images), progress, f"synth {out.name}"):
        rng = np.random.default_rng([seed, 0, i])
        h, w = frame_size(imgsz, rng)
        image, boxes, classes = render_scene(rng, (h, w))
        split = "val" if i in val_ids else "train"
        Image.fromarray(image).save(out / "images" / split / f"{i:06d}.jpg", quality=JPEG_QUALITY)
        (out / "labels" / split / f"{i:06d}.txt").write_text(_label_text(boxes, classes, h, w))
    data = {"path": str(out), "train": "images/train", "val": "images/val", "nc": len(CLASS_NAMES),
            "names": dict(enumerate(CLASS_NAMES)), "generator": GENERATOR_TAG, "seed": seed,
            "imgsz": list(imgsz) if not isinstance(imgsz, int) else imgsz, "images": {"train": n_train, "val": n_val}}
    yaml_path = out / "data.yaml"
    header = f"# Synthetic factory defects written by `{GENERATOR_TAG}`; regenerate rather than edit.\n"
    yaml_path.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return yaml_path


def _label_text(boxes: np.ndarray, classes: np.ndarray, h: int, w: int) -> str:
    rows = []
    for (x1, y1, x2, y2), c in zip(boxes.tolist(), classes.tolist()):
        rows.append(f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}\n")
    return "".join(rows)


def _split_sizes(images: int, val_fraction: float) -> tuple[int, int]:
    if not isinstance(images, int) or images < 1:
        raise ValueError(f"images={images!r}: ask for at least 1 image")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}: must be in [0, 1)")
    n_val = max(1, round(images * val_fraction)) if val_fraction > 0 else 0
    if images - n_val < 1:
        raise ValueError(f"{images} image(s) with val_fraction={val_fraction} leaves no training image; "
                         "ask for more images")
    return n_val, images - n_val


MAX_SIDE = 4096  # drawing a 4096x4096 frame peaks near 1 GB of memory; 100000 would ask for 63 GiB


def _check_imgsz(imgsz: int | tuple[int, int]) -> None:
    """Each side in 32..MAX_SIDE: smaller frames cannot hold a defect, larger ones exhaust memory while drawing."""
    sides = [imgsz] if isinstance(imgsz, int) else list(imgsz)
    if len(sides) not in (1, 2) or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                                           and 32 <= s <= MAX_SIDE for s in sides):
        raise ValueError(f"imgsz={imgsz!r}: give one side (e.g. 640) or (h, w) (e.g. (360, 640)), each in "
                         f"32..{MAX_SIDE}")


def _prepare(out: Path) -> None:
    """Make `out` ready: new or empty is fine; an earlier synth output is cleared; anything else is refused."""
    if not out.exists():
        try:
            out.mkdir(parents=True)
        except OSError as e:
            raise ValueError(f"--out {out}: cannot create the folder ({e.strerror or e}); give a folder you can "
                             "write to") from None
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if not any(out.iterdir()):
        return
    previous = out / "data.yaml"
    try:
        tag = yaml.safe_load(previous.read_text()).get("generator") if previous.is_file() else None
    except (yaml.YAMLError, AttributeError, OSError):
        tag = None
    if tag != GENERATOR_TAG:
        raise ValueError(f"--out {out} is not empty and not an earlier `{GENERATOR_TAG}` output; "
                         "give a new or empty folder")
    for sub in ("images", "labels"):
        shutil.rmtree(out / sub, ignore_errors=True)
    previous.unlink()


def _progress(items: range, enabled: bool, desc: str) -> Iterable[int]:
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # the serving install has no tqdm: generate without a bar
        return items
    return tqdm(items, desc=desc, unit="img")


def _parse_imgsz(text: str) -> int | tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': expected one side (640) or HxW (360x640)") from None
    if len(sides) == 1:
        return sides[0]
    if len(sides) == 2:
        return sides[0], sides[1]
    raise argparse.ArgumentTypeError(f"'{text}': expected one side (640) or HxW (360x640)")


def synth_main(argv: list[str] | None = None) -> int:
    """`yolov12-data synth --out DIR [--images N] [--imgsz 640|HxW] [--seed S] [--val-fraction F]`: the exit code.

    `argv` is what follows `synth` on the command line (a leading 'synth' is accepted too).
    """
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["synth"]:
        args_in = args_in[1:]
    from ..cli import OneLineParser

    parser = OneLineParser(prog=GENERATOR_TAG, description="Write a synthetic factory-defect dataset "
                                     f"({', '.join(CLASS_NAMES)}) in YOLO format with exact labels.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--out", required=True, type=Path, help="output folder (new, empty, or an earlier synth run)")
    parser.add_argument("--images", type=int, default=200, help="number of images (default 200)")
    parser.add_argument("--imgsz", type=_parse_imgsz, default=640,
                        help="long side with mixed 16:9/4:3/square frames, or a fixed HxW (default 640)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same dataset (default 0)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of images in val (default 0.2)")
    args = parser.parse_args(args_in)
    start = time.perf_counter()
    try:
        path = synthesize(args.out, images=args.images, imgsz=args.imgsz, val_fraction=args.val_fraction,
                          seed=args.seed, progress=True)
    except ValueError as e:  # one line, exit status 2 (the project's rule for bad input)
        print(f"{GENERATOR_TAG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the folder vanished or the disk filled up while writing
        print(f"{GENERATOR_TAG}: error: writing {args.out} failed ({e.strerror or e}); free space or give another "
              "--out folder", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(f"wrote {args.images} images in {seconds:.1f} s ({args.images / seconds:.0f} images/s): {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(synth_main())
