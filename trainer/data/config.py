"""`data.yaml` (the YOLO dataset format): where a split's images and labels are, and the class names.

    path: /data/defects          # root; relative -> against the yaml's folder; absent -> the yaml's folder
    train: images/train          # a folder, a .txt list of image paths, or a list of either
    val: [images/val, extra.txt]
    names: {0: scratch, 1: dent}  # or a list

Split paths resolve against `path`, then against the yaml's folder. Labels sit beside the images
with the last `/images/` replaced by `/labels/` and the suffix by `.txt` (the YOLO convention).
Every mistake in the file itself is one `DataError` whose message names the path and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["IMAGE_SUFFIXES", "DataConfig", "DataError", "label_path_for", "load_data_config"]

IMAGE_SUFFIXES = frozenset({".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".pbm", ".pgm", ".ppm"})
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A dataset problem that stops the run (bad data.yaml, missing folder, empty split); the message says the fix."""


@dataclass(frozen=True)
class DataConfig:
    """A loaded data.yaml: the root, each split's image files (sorted), the class names."""

    yaml_path: Path
    root: Path
    names: dict[int, str]
    splits: dict[str, list[Path]] = field(repr=False)

    @property
    def nc(self) -> int:
        """Number of classes."""
        return len(self.names)

    def images(self, split: str) -> list[Path]:
        """The image files of `split` ('train', 'val' or 'test'); a DataError when the yaml has no such split."""
        if split not in self.splits:
            have = ", ".join(self.splits) or "none"
            raise DataError(f"{self.yaml_path}: no '{split}' split (it has: {have}); add '{split}: <folder or list>'")
        return self.splits[split]


def label_path_for(image: str | Path) -> Path:
    """The label file of an image: the last `/images/` becomes `/labels/`, the suffix `.txt`."""
    text = str(image)
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if sa in text:
        head, tail = text.rsplit(sa, 1)
        text = f"{head}{sb}{tail}"
    return Path(text).with_suffix(".txt")


def load_data_config(path: str | Path) -> DataConfig:
    """Read and check a data.yaml: splits resolved to image lists, names to {id: name}; DataError on any mistake."""
    yaml_path = Path(path).expanduser()
    if not yaml_path.is_file():
        raise DataError(f"{yaml_path}: data.yaml not found; pass the path of an existing dataset yaml "
                        "(e.g. one written by `yolov12-data synth --out DIR`)")
    try:
        raw = yaml.safe_load(yaml_path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{yaml_path}: not valid YAML ({e}); fix the file's syntax") from None
    except yaml.YAMLError as e:  # its str() spans lines with a caret drawing: keep where and what, on one line
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise DataError(f"{yaml_path}: not valid YAML{where} ({what}); fix the file's syntax") from None
    if not isinstance(raw, dict):
        raise DataError(f"{yaml_path}: expected a mapping with 'path', 'train', 'val', 'names'; "
                        f"got {type(raw).__name__}")
    if raw.get("complete") is False:  # the placeholder an interrupted `yolov12-data synth` run leaves
        raise DataError(f"{yaml_path}: an unfinished `{raw.get('generator', 'dataset generator')}` run; run it again "
                        "to write the dataset")

    yaml_dir = yaml_path.resolve().parent
    root = Path(str(raw.get("path") or yaml_dir)).expanduser()
    if not root.is_absolute():
        root = (yaml_dir / root).resolve()
    names = _parse_names(raw, yaml_path)
    _check_nc(raw, names, yaml_path)

    splits: dict[str, list[Path]] = {}
    for split in SPLITS:
        if raw.get(split) in (None, "", []):
            if split != "test":
                raise DataError(f"{yaml_path}: no '{split}' entry; add '{split}: images/{split}' "
                                "(a folder, a .txt list of images, or a list of either)")
            continue
        sources = raw[split] if isinstance(raw[split], list) else [raw[split]]
        files: list[Path] = []
        for source in sources:
            files += _list_images(_resolve(str(source), root, yaml_dir, yaml_path, split))
        if not files:
            shown = ", ".join(str(s) for s in sources)
            raise DataError(f"{yaml_path}: split '{split}' is empty: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                            f"under {shown}; put images there or point '{split}' at the right folder")
        splits[split] = sorted(dict.fromkeys(files))
    return DataConfig(yaml_path=yaml_path, root=root, names=names, splits=splits)


def _parse_names(raw: dict[str, Any], yaml_path: Path) -> dict[int, str]:
    names = raw.get("names")
    if not names:
        raise DataError(f"{yaml_path}: no class 'names'; add e.g. 'names: [scratch, dent]' or 'names: {{0: scratch}}'")
    if isinstance(names, list):
        return {i: str(n) for i, n in enumerate(names)}
    if isinstance(names, dict):
        try:
            parsed = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise DataError(f"{yaml_path}: 'names' keys must be class ids 0..n-1, got {list(names)}") from None
        if sorted(parsed) != list(range(len(parsed))):
            raise DataError(f"{yaml_path}: 'names' ids must be 0..{len(parsed) - 1} without gaps, got {sorted(parsed)}")
        return dict(sorted(parsed.items()))
    raise DataError(f"{yaml_path}: 'names' must be a list or a {{id: name}} mapping, got {type(names).__name__}")


def _check_nc(raw: dict[str, Any], names: dict[int, str], yaml_path: Path) -> None:
    """An `nc` that disagrees with `names` is a DataError naming both: trained on, labels of the classes beyond the
    names would be dropped (or the names would be wrong)."""
    if "nc" not in raw or raw["nc"] == len(names):
        return
    shown = ", ".join(list(names.values())[:10]) + (", ..." if len(names) > 10 else "")
    raise DataError(f"{yaml_path}: 'nc: {raw['nc']}' but 'names' lists {len(names)} classes ({shown}); make them "
                    "agree (names decide the classes: fix the names, or drop nc)")


def _resolve(source: str, root: Path, yaml_dir: Path, yaml_path: Path, split: str) -> Path:
    p = Path(source).expanduser()
    candidates = [p] if p.is_absolute() else [root / p, yaml_dir / p]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    tried = " or ".join(str(c) for c in candidates)
    raise DataError(f"{yaml_path}: '{split}: {source}' does not exist (looked for {tried}); "
                    "create it or fix the path (relative paths resolve against 'path', then the yaml's folder)")


def _list_images(source: Path) -> list[Path]:
    """Images under a folder (recursive) or listed in a .txt file (relative lines resolve against the file's folder)."""
    if source.is_dir():
        return [p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if source.suffix.lower() in IMAGE_SUFFIXES:
        return [source]
    lines = source.read_text(encoding="utf-8-sig").splitlines()
    files = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line).expanduser()
            files.append(p if p.is_absolute() else (source.parent / p))
    # Listed files that are missing or not images are reported when the split is scanned, not dropped here.
    return [Path(os.path.normpath(f)) for f in files]
