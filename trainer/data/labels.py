"""Read and check a split's images and YOLO label files, keeping every good row and reporting every bad one.

A label row is `cls cx cy w h` (normalised to 0..1), or a polygon `cls x1 y1 x2 y2 ...` that becomes its
bounding box. A bad row (class id not an integer or out of range, wrong column count, not numbers, box out
of bounds beyond `BOUNDS_TOLERANCE`, zero or negative size, a duplicate) is reported with file and line and
skipped; the file's good rows are kept. A tiny overshoot is clipped and counted. A missing label file means
"no objects" (a background image). An unreadable or corrupt image is reported and skipped. Nothing is lost
silently: `LabelReport` counts each kind and keeps the first lines, and the trainer logs it once.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .config import IMAGE_SUFFIXES, label_path_for

__all__ = ["BOUNDS_TOLERANCE", "ImageRecord", "LabelReport", "parse_label_file", "read_image_shape", "scan_split"]

LOGGER = logging.getLogger("trainer.data")
BOUNDS_TOLERANCE = 0.01  # boxes may overshoot the image by 1% of its size: clipped, not rejected
MIN_IMAGE_SIDE = 10
_EXIF_ORIENTATION = 274
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class ImageRecord:
    """One usable image: its file, original (h, w), class ids [n] and boxes [n, 4] (normalised cx cy w h)."""

    im_file: str
    shape: tuple[int, int]
    cls: np.ndarray
    boxes: np.ndarray


@dataclass
class LabelReport:
    """Problems found while scanning a split: a count per kind and the first `max_lines` messages."""

    split: str = ""
    max_lines: int = 20
    counts: Counter = field(default_factory=Counter)
    lines: list[str] = field(default_factory=list)
    images_found: int = 0
    images_used: int = 0
    backgrounds: int = 0
    boxes_used: int = 0

    def add(self, kind: str, message: str) -> None:
        """Record one problem of `kind` (e.g. 'out of bounds'); `message` names the file and line."""
        self.counts[kind] += 1
        if len(self.lines) < self.max_lines:
            self.lines.append(message)
        LOGGER.debug("%s", message)

    @property
    def problems(self) -> int:
        """Number of problems of every kind (clipped rows included: they were changed, not lost)."""
        return sum(self.counts.values())

    def summary(self) -> str:
        """A few readable lines: what was used, then each problem kind with its count and the first messages."""
        head = (f"{self.split or 'data'}: {self.images_used}/{self.images_found} images used "
                f"({self.backgrounds} without objects), {self.boxes_used} boxes")
        if not self.counts:
            return head + ", no label problems"
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.counts.items()))
        more = self.problems - len(self.lines)
        tail = [f"  {line}" for line in self.lines] + ([f"  ... and {more} more"] if more > 0 else [])
        return "\n".join([f"{head}; {self.problems} problems ({kinds}):", *tail])

    def log(self, logger: logging.Logger = LOGGER) -> None:
        """Log the summary once: as a warning when there were problems, else as info."""
        logger.log(logging.WARNING if self.counts else logging.INFO, "%s", self.summary())


def read_image_shape(path: Path) -> tuple[int, int]:
    """Check an image file opens and is complete; return its (h, w) as decoders show it (EXIF rotation applied).

    Raises ValueError with the reason (unsupported format, corrupt, truncated, too small).
    """
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"unsupported image format '{path.suffix}' (use one of {', '.join(sorted(IMAGE_SUFFIXES))})")
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() leaves the file unusable: reopen for size and EXIF
            w, h = im.size
            if im.format == "JPEG":
                if im.getexif().get(_EXIF_ORIENTATION) in _ROTATED:
                    w, h = h, w
                with open(path, "rb") as f:
                    f.seek(-2, 2)
                    if f.read() != b"\xff\xd9":
                        raise ValueError("truncated JPEG (no end-of-image marker)")
    except ValueError:
        raise
    except Exception as e:  # Pillow raises many kinds for broken files (and its plugins more)
        raise ValueError(f"corrupt image ({e})") from None
    if min(h, w) < MIN_IMAGE_SIDE:
        raise ValueError(f"image too small ({w}x{h}; each side must be at least {MIN_IMAGE_SIDE} px)")
    return h, w


def parse_label_file(path: Path, nc: int, report: LabelReport) -> tuple[np.ndarray, np.ndarray]:
    """Good rows of a label file as (cls int64 [n], boxes float32 [n, 4] cx cy w h); bad rows go to `report`.

    A missing file gives no rows (a background image). Raises ValueError if the file cannot be read as text.
    """
    if not path.exists():
        return np.zeros(0, np.int64), np.zeros((0, 4), np.float32)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"unreadable label file ({e})") from None
    cls_ids: list[int] = []
    boxes: list[tuple[float, float, float, float]] = []
    seen: dict[tuple, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        row = _parse_row(fields, nc, where, report)
        if row is None:
            continue
        key = (row[0], *(round(v, 6) for v in row[1]))
        if key in seen:
            report.add("duplicate row", f"{where}: duplicate of line {seen[key]} ('{line.strip()}'); skipped")
            continue
        seen[key] = lineno
        cls_ids.append(row[0])
        boxes.append(row[1])
    return np.array(cls_ids, np.int64), np.array(boxes, np.float32).reshape(-1, 4)


def _parse_row(fields: list[str], nc: int, where: str, report: LabelReport
               ) -> tuple[int, tuple[float, float, float, float]] | None:
    """One row -> (class id, cx cy w h) or None after reporting why it was skipped."""
    n = len(fields)
    if n != 5 and (n < 7 or n % 2 == 0):
        report.add("wrong column count", f"{where}: {n} values, expected 5 ('cls cx cy w h') or a polygon "
                                         "'cls x1 y1 x2 y2 x3 y3 ...'; skipped")
        return None
    try:
        values = [float(v) for v in fields]
    except ValueError:
        report.add("not a number", f"{where}: '{' '.join(fields)}' has a value that is not a number; skipped")
        return None
    if not all(math.isfinite(v) for v in values):
        report.add("not a number", f"{where}: '{' '.join(fields)}' has nan or inf; skipped")
        return None
    c = values[0]
    if c != int(c):
        report.add("class not an integer", f"{where}: class id {fields[0]} is not an integer; skipped")
        return None
    if not 0 <= c < nc:
        report.add("class out of range", f"{where}: class id {int(c)} is outside 0..{nc - 1} "
                                         f"(data.yaml names {nc} classes); skipped")
        return None
    if n == 5:
        cx, cy, w, h = values[1:]
        if w <= 0 or h <= 0:
            report.add("non-positive size", f"{where}: box width/height {w:g}/{h:g} must be > 0; skipped")
            return None
        x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    else:
        xs, ys = values[1::2], values[2::2]
        x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
    lo, hi = -BOUNDS_TOLERANCE, 1 + BOUNDS_TOLERANCE
    if min(x1, y1) < lo or max(x2, y2) > hi:
        report.add("out of bounds", f"{where}: box x {x1:.4f}..{x2:.4f}, y {y1:.4f}..{y2:.4f} leaves the image "
                                    f"(coordinates must be normalised to 0..1); skipped")
        return None
    clipped = (max(x1, 0.0), max(y1, 0.0), min(x2, 1.0), min(y2, 1.0))
    if clipped[2] - clipped[0] <= 0 or clipped[3] - clipped[1] <= 0:
        report.add("non-positive size", f"{where}: box has no area inside the image; skipped")
        return None
    if clipped != (x1, y1, x2, y2) and n == 5:
        report.add("clipped", f"{where}: box overshoots the image edge by < {BOUNDS_TOLERANCE:g}; clipped and kept")
    x1, y1, x2, y2 = clipped
    return int(c), ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)


def _scan_one(im_file: Path, nc: int) -> tuple[ImageRecord | None, LabelReport]:
    """Check one image and read its labels; problems go to a private report merged in order by the caller."""
    report = LabelReport(max_lines=10**9)
    if not im_file.exists():
        report.add("missing image", f"{im_file}: listed but does not exist; skipped")
        return None, report
    try:
        shape = read_image_shape(im_file)
    except ValueError as e:
        report.add("corrupt image", f"{im_file}: {e}; skipped")
        return None, report
    label_file = label_path_for(im_file)
    try:
        cls_ids, boxes = parse_label_file(label_file, nc, report)
    except ValueError as e:
        report.add("unreadable label file", f"{label_file}: {e}; image skipped")
        return None, report
    return ImageRecord(str(im_file), shape, cls_ids, boxes), report


def scan_split(images: Sequence[Path], nc: int, split: str = "", workers: int = 8,
               max_lines: int = 20) -> tuple[list[ImageRecord], LabelReport]:
    """Check every image and label of a split (threads, order kept); return the usable records and the report."""
    report = LabelReport(split=split, max_lines=max_lines, images_found=len(images))
    with ThreadPoolExecutor(max(1, min(workers, len(images)))) as pool:
        results = list(pool.map(lambda f: _scan_one(Path(f), nc), images))
    records = []
    for record, part in results:
        for kind, count in part.counts.items():
            report.counts[kind] += count
        report.lines += part.lines[: max(0, max_lines - len(report.lines))]
        if record is not None:
            records.append(record)
            report.backgrounds += len(record.cls) == 0
            report.boxes_used += len(record.cls)
    report.images_used = len(records)
    return records, report
