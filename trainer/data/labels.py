"""Read and check a split's images and YOLO label files, reporting every bad row and every skipped image.

A label row is `cls cx cy w h` (normalised to 0..1), or a polygon `cls x1 y1 x2 y2 ...` that becomes its
bounding box. A bad row (class id not an integer or out of range, wrong column count, not numbers, box out
of bounds beyond `BOUNDS_TOLERANCE`, zero or negative size) is reported with file and line, and its whole
image is skipped (as ultralytics does): kept, the image would teach the unlabelled object as background. A
duplicate row is dropped and a tiny overshoot clipped, both counted; their images are kept. A missing label
file means "no objects" (a background image), counted apart from an empty one and warned about. An image
that is unreadable, corrupt or deeper than 8 bits a channel (what serving refuses) is reported and skipped.
Nothing is lost silently: `LabelReport` counts each kind and keeps the first lines, and the trainer shows it.
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
from PIL import Image, ImageOps

from .config import IMAGE_SUFFIXES, label_path_for

__all__ = ["BOUNDS_TOLERANCE", "EIGHT_BIT_MODES", "ImageRecord", "LabelReport", "parse_label_file", "read_image_info",
           "read_image_shape", "scan_split"]

LOGGER = logging.getLogger("trainer.data")
BOUNDS_TOLERANCE = 0.01  # boxes may overshoot the image by 1% of its size: clipped, not rejected
MIN_IMAGE_SIDE = 10
_EXIF_ORIENTATION = 274
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
# Pillow modes of at most 8 bits a channel: what yolov12_serve.preprocess.check_eight_bit accepts, so the model
# never trains on an image that serving refuses (a 16-bit or float image: I;16, I, F ...)
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
KEPT_ROW_KINDS = frozenset({"clipped", "duplicate row"})  # row problems that leave the image's labels complete


class ImageError(ValueError):
    """Why an image is skipped; `kind` is the problem kind `LabelReport` counts it under."""

    def __init__(self, message: str, kind: str = "corrupt image") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ImageRecord:
    """One usable image: its file, original (h, w) upright, class ids [n], boxes [n, 4] (normalised cx cy w h),
    and the EXIF orientation (1..8) the loader applies to the pixels to make them upright."""

    im_file: str
    shape: tuple[int, int]
    cls: np.ndarray
    boxes: np.ndarray
    orientation: int = 1


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
    no_label_file: int = 0  # used images without a label file (backgrounds too, counted apart from empty files)
    bad_label_images: int = 0  # images skipped because a row of their label file was bad
    label_dirs: Counter = field(default_factory=Counter)  # where the missing label files were looked for

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

    def looked_for(self) -> str:
        """Where the missing label files were looked for, as a glob: 'DIR/*.txt' (and how many other folders)."""
        if not self.label_dirs:
            return "the labels/ folder beside images/"
        (top, _), others = self.label_dirs.most_common(1)[0], len(self.label_dirs) - 1
        return f"{Path(top) / '*.txt'}" + (f" and {others} more folder{'s' * (others > 1)}" if others else "")

    def warnings(self) -> list[str]:
        """Lines for what trains but is likely a mistake: images without a label file, a split without boxes."""
        name, lines = self.split or "data", []
        if self.no_label_file:
            lines.append(f"WARNING {name}: {self.no_label_file} of {self.images_used} images have no label file "
                         f"(looked for {self.looked_for()}: images/ -> labels/, as ultralytics); they train as "
                         "backgrounds")
        if self.images_used and not self.boxes_used:
            lines.append(f"WARNING {name}: no boxes in any of its {self.images_used} images; check the label files")
        return lines

    def no_boxes_message(self) -> str:
        """One line for a split that has no box at all: where labels were looked for, or what the files held."""
        name = self.split or "data"
        if self.no_label_file == self.images_used:
            return (f"no labels found for any of {self.images_used} {name} images: looked for {self.looked_for()} "
                    "(images/ -> labels/, as ultralytics); put the YOLO .txt label files there or fix the folder "
                    "names")
        empty = self.backgrounds - self.no_label_file
        return (f"no boxes in the {name} split: of {self.images_used} images used, {self.no_label_file} have no "
                f"label file and {empty} an empty one ({self.bad_label_images} more skipped for bad label rows); "
                "label the objects ('cls cx cy w h' rows) before training")

    def summary(self) -> str:
        """A few readable lines: what was used, each problem kind with its count and the first messages, warnings."""
        missing = f", {self.no_label_file} of them with no label file" if self.no_label_file else ""
        bad = f", {self.bad_label_images} skipped for bad label rows" if self.bad_label_images else ""
        head = (f"{self.split or 'data'}: {self.images_used}/{self.images_found} images used "
                f"({self.backgrounds} without objects{missing}){bad}, {self.boxes_used} boxes")
        if not self.counts:
            return "\n".join([head + ", no label problems", *self.warnings()])
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.counts.items()))
        more = self.problems - len(self.lines)
        tail = [f"  {line}" for line in self.lines] + ([f"  ... and {more} more"] if more > 0 else [])
        return "\n".join([f"{head}; {self.problems} problems ({kinds}):", *tail, *self.warnings()])

    @property
    def needs_attention(self) -> bool:
        """True when something was skipped, changed or looks wrong: the summary is then a warning."""
        return bool(self.counts or self.warnings())

    def log(self, logger: logging.Logger = LOGGER) -> None:
        """Log the summary once: as a warning when there were problems or warnings, else as info."""
        logger.log(logging.WARNING if self.needs_attention else logging.INFO, "%s", self.summary())


def read_image_shape(path: Path) -> tuple[int, int]:
    """Check an image file opens and is complete; return its (h, w) as decoders show it (EXIF rotation applied).

    Raises ValueError with the reason (unsupported format, corrupt, truncated, too small, deeper than 8 bits).
    """
    return read_image_info(path)[0]


def read_image_info(path: Path) -> tuple[tuple[int, int], int]:
    """Check an image opens, is complete and has at most 8 bits a channel; return its upright (h, w) and its
    EXIF orientation (1..8, any format), which the loader applies itself so that pixels and shape always agree.

    Raises ImageError (a ValueError) with the reason and the kind it is counted under.
    """
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ImageError(f"unsupported image format '{path.suffix}' (use one of {', '.join(sorted(IMAGE_SUFFIXES))})")
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() leaves the file unusable: reopen for size, mode and EXIF
            if im.mode not in EIGHT_BIT_MODES:
                raise ImageError(f"a {im.format or ''} image in mode {im.mode} (more than 8 bits a channel): convert "
                                 "it to 8-bit RGB (serving refuses such images, so the model must not train on them)",
                                 kind="more than 8 bits")
            if im.format == "JPEG" and not _ends_with_eoi(path):
                _decode_fully(im)
            orientation = _orientation(im)
            w, h = _upright_size(im, orientation)
    except ValueError:
        raise
    except Exception as e:  # Pillow raises many kinds for broken files (and its plugins more)
        raise ImageError(f"corrupt image ({e})") from None
    if min(h, w) < MIN_IMAGE_SIDE:
        raise ImageError(f"image too small ({w}x{h}; each side must be at least {MIN_IMAGE_SIDE} px)")
    return (h, w), orientation


def _upright_size(im: Image.Image, orientation: int) -> tuple[int, int]:
    """(w, h) once turned upright. A TIFF with an orientation is measured decoded (Pillow, like libtiff, turns those
    itself while loading); other formats report the stored size, which a quarter turn swaps."""
    if orientation != 1 and im.format == "TIFF":
        return ImageOps.exif_transpose(im).size
    w, h = im.size
    return (h, w) if orientation in _ROTATED else (w, h)


def _ends_with_eoi(path: Path) -> bool:
    """True when a JPEG file's last two bytes are the end-of-image marker FFD9 (the usual, cheap case)."""
    with open(path, "rb") as f:
        f.seek(-2, 2)
        return f.read() == b"\xff\xd9"


def _decode_fully(im: Image.Image) -> None:
    """Decode a JPEG that does not end in FFD9: cameras often write trailer bytes after the marker (kept), while a
    file cut short fails to decode (ImageError 'truncated JPEG')."""
    try:
        im.load()
    except Exception as e:
        raise ImageError(f"truncated JPEG (no end-of-image marker, and it does not decode to the end: {e})") from None


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation 1..8 (1 = upright; an absent, invalid or unreadable tag is 1, as exif_transpose does)."""
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block: decoders show the pixels as stored
        return 1
    return value if value in range(1, 9) else 1


def parse_label_file(path: Path, nc: int, report: LabelReport) -> tuple[np.ndarray, np.ndarray]:
    """Good rows of a label file as (cls int64 [n], boxes float32 [n, 4] cx cy w h); bad rows go to `report` (the
    scan then skips the image: see `KEPT_ROW_KINDS`).

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
            report.add("duplicate row", f"{where}: duplicate of line {seen[key]} ('{line.strip()}'); dropped, "
                                        "image kept")
            continue
        seen[key] = lineno
        cls_ids.append(row[0])
        boxes.append(row[1])
    return np.array(cls_ids, np.int64), np.array(boxes, np.float32).reshape(-1, 4)


def _parse_row(fields: list[str], nc: int, where: str, report: LabelReport
               ) -> tuple[int, tuple[float, float, float, float]] | None:
    """One row -> (class id, cx cy w h) or None after reporting why it is bad (its image is skipped)."""
    n = len(fields)
    if n != 5 and (n < 7 or n % 2 == 0):
        report.add("wrong column count", f"{where}: {n} values, expected 5 ('cls cx cy w h') or a polygon "
                                         "'cls x1 y1 x2 y2 x3 y3 ...'; image skipped")
        return None
    try:
        values = [float(v) for v in fields]
    except ValueError:
        report.add("not a number", f"{where}: '{' '.join(fields)}' has a value that is not a number; image skipped")
        return None
    if not all(math.isfinite(v) for v in values):
        report.add("not a number", f"{where}: '{' '.join(fields)}' has nan or inf; image skipped")
        return None
    c = values[0]
    if c != int(c):
        report.add("class not an integer", f"{where}: class id {fields[0]} is not an integer; image skipped")
        return None
    if not 0 <= c < nc:
        report.add("class out of range", f"{where}: class id {int(c)} is outside 0..{nc - 1} "
                                         f"(data.yaml names {nc} classes); image skipped")
        return None
    if n == 5:
        cx, cy, w, h = values[1:]
        if w <= 0 or h <= 0:
            report.add("non-positive size", f"{where}: box width/height {w:g}/{h:g} must be > 0; image skipped")
            return None
        x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    else:
        xs, ys = values[1::2], values[2::2]
        x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
    lo, hi = -BOUNDS_TOLERANCE, 1 + BOUNDS_TOLERANCE
    if min(x1, y1) < lo or max(x2, y2) > hi:
        report.add("out of bounds", f"{where}: box x {x1:.4f}..{x2:.4f}, y {y1:.4f}..{y2:.4f} leaves the image "
                                    f"(coordinates must be normalised to 0..1); image skipped")
        return None
    clipped = (max(x1, 0.0), max(y1, 0.0), min(x2, 1.0), min(y2, 1.0))
    if clipped[2] - clipped[0] <= 0 or clipped[3] - clipped[1] <= 0:
        report.add("non-positive size", f"{where}: box has no area inside the image; image skipped")
        return None
    if clipped != (x1, y1, x2, y2):  # a box or a polygon
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
        shape, orientation = read_image_info(im_file)
    except ValueError as e:
        report.add(getattr(e, "kind", "corrupt image"), f"{im_file}: {e}; skipped")
        return None, report
    label_file = label_path_for(im_file)
    try:
        cls_ids, boxes = parse_label_file(label_file, nc, report)
    except ValueError as e:
        report.add("unreadable label file", f"{label_file}: {e}; image skipped")
        return None, report
    if any(kind not in KEPT_ROW_KINDS for kind in report.counts):
        report.bad_label_images = 1  # its rows were reported with file:line
        return None, report
    if not label_file.exists():
        report.no_label_file = 1
        report.label_dirs[str(label_file.parent)] += 1
    return ImageRecord(str(im_file), shape, cls_ids, boxes, orientation), report


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
        report.no_label_file += part.no_label_file
        report.bad_label_images += part.bad_label_images
        report.label_dirs.update(part.label_dirs)
        if record is not None:
            records.append(record)
            report.backgrounds += len(record.cls) == 0
            report.boxes_used += len(record.cls)
    report.images_used = len(records)
    return records, report
