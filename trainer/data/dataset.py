"""`DetectionDataset`: a checked YOLO split as augmented samples, and `collate` into the batch the loss consumes.

Batch (the ultralytics layout):

    img        uint8 [B, 3, H, W] RGB
    batch_idx  float [M]        image index of each box
    cls        float [M, 1]
    bboxes     float [M, 4]     cx cy w h normalised to the (padded) input image
    im_file    list[str]
    ori_shape  list[(h, w)]     original image size
    ratio_pad  list[((rh, rw), (pad_w, pad_h))]   input = original * r + pad (meaningful without augmentation)

Augmentation is reproducible: sample i of epoch e is drawn from `numpy.random.default_rng([seed, e, i])`, so
the same seed and epoch give the same batch whatever the number of workers or ranks. The epoch and the
close-mosaic switch live in a small shared-memory tensor, so `set_epoch` and `close_mosaic` reach
persistent DataLoader workers too (call them before iterating the epoch).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .augment import Compose, CopyPaste, LetterBox, MixUp, Mosaic, RandomAffine, RandomFlip, RandomHSV, check_hyp
from .config import DataConfig, DataError
from .labels import ImageRecord, scan_split

__all__ = ["DetectionDataset", "collate"]

Sample = dict[str, Any]
RECENT_MAX_BYTES = 512 << 20  # per process
_CACHE_MODES = {False: None, None: None, "": None, True: "ram", "ram": "ram", "disk": "disk"}


class DetectionDataset(Dataset):
    """Images and boxes of one split of a data.yaml, letterboxed (eval) or augmented with the recipe (train).

    cache: False, "ram" (resized uint8 images kept in memory) or "disk" (decoded images as `NAME.EXT.rgb.npy`
    beside the images, reused while newer than the image). rect: rectangular batches (images sorted by aspect
    ratio, each batch padded to its widest image rounded up to the stride plus `pad` strides, as
    ultralytics' validation does); use with a non-shuffled loader of the same `batch_size`.
    seed: augmentations of sample i in epoch e come from rng(seed, e, i). workers: threads for the scan and
    cache. verbose: log the label report (pass False on ranks other than 0).
    """

    @staticmethod
    def collate_fn(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """`collate` under ultralytics' name, for code that builds its own DataLoader."""
        return collate(items)

    def __init__(self, cfg: DataConfig, split: str, imgsz: int = 640, augment: bool = False,
                 hyp: Mapping[str, Any] | None = None, cache: bool | str | None = False, rect: bool = False,
                 batch_size: int = 16, stride: int = 32, pad: float = 0.5, seed: int = 0, workers: int = 8,
                 verbose: bool = True) -> None:
        if not isinstance(imgsz, int) or imgsz < stride or imgsz % stride:
            raise ValueError(f"imgsz={imgsz!r}: must be a positive multiple of the stride {stride} (e.g. 320, 640)")
        if cache not in _CACHE_MODES:
            raise ValueError(f"cache={cache!r}: use False, 'ram' (or True) or 'disk'")
        self.cfg, self.split, self.imgsz, self.augment, self.rect = cfg, split, imgsz, augment, rect
        self.stride, self.pad, self.seed, self.batch_size = stride, pad, seed, batch_size
        self.hyp = check_hyp(hyp)
        self.names = dict(cfg.names)
        records, self.report = scan_split(cfg.images(split), cfg.nc, split=split, workers=workers)
        if verbose:  # once (rank 0): problems per kind and the first lines
            self.report.log()
        if not records:
            raise DataError(f"{cfg.yaml_path}: split '{split}' has no usable images "
                            f"({self.report.images_found} found, all skipped):\n{self.report.summary()}")
        self.records: list[ImageRecord] = records
        self.batch_shapes: np.ndarray | None = None
        self.batch_index: np.ndarray | None = None
        if rect:
            self._set_rectangles()
        self._state = torch.zeros(2, dtype=torch.int64).share_memory_()  # [epoch, mosaic closed]
        self.cache = _CACHE_MODES[cache]
        self._ram: list[np.ndarray | None] = [None] * len(self.records)
        if self.cache:
            self._fill_cache(workers)
        # Decoded images recently used, per process: a mosaic reads four, so most reads hit. Only a memo of a pure
        # function of the index: it changes speed, never samples. Bounded like ultralytics' buffer.
        self._recent: OrderedDict[int, np.ndarray] = OrderedDict()
        self._recent_budget = min(len(self), max(32, batch_size * 8), 1000) if augment and self.cache != "ram" else 0
        self._recent_bytes = 0
        self._pipelines = {closed: self._build_pipeline(closed) for closed in (False, True)}

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the pipelines (closures) and the per-process memo: for 'spawn' DataLoader workers."""
        state = dict(self.__dict__)
        state.update(_pipelines=None, _recent=OrderedDict(), _recent_bytes=0)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pipelines = {closed: self._build_pipeline(closed) for closed in (False, True)}

    # ----------------------------------------------------------------------------------------------- state
    def __len__(self) -> int:
        return len(self.records)

    @property
    def epoch(self) -> int:
        """The epoch whose augmentations `__getitem__` draws."""
        return int(self._state[0])

    @property
    def mosaic_closed(self) -> bool:
        """True once `close_mosaic()` switched mosaic, mixup and copy-paste off."""
        return bool(self._state[1])

    def set_epoch(self, epoch: int) -> None:
        """Draw the next samples' augmentations for `epoch` (the trainer calls this before each epoch)."""
        self._state[0] = int(epoch)

    def close_mosaic(self) -> None:
        """Switch mosaic, mixup and copy-paste off (the recipe's last `close_mosaic` epochs)."""
        self._state[1] = 1

    # --------------------------------------------------------------------------------------------- samples
    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, closed = (int(v) for v in self._state.tolist())
        sample = self.load(index)
        sample["rng"] = np.random.default_rng([self.seed, epoch, index])
        if self.batch_shapes is not None:
            sample["rect_shape"] = tuple(int(v) for v in self.batch_shapes[self.batch_index[index]])
        return _to_item(self._pipelines[bool(closed)](sample))

    def load(self, index: int) -> Sample:
        """Image `index` resized so its long side is `imgsz`, with its boxes in xyxy pixels of that image."""
        record = self.records[index]
        img = self._ram[index] if self.cache == "ram" else self._recent.get(index)
        if img is not None and self._recent_budget:
            self._recent.move_to_end(index)
        if img is None:
            img = self._resize(self._read(index))
            if self._recent_budget:
                self._remember(index, img)
        h, w = img.shape[:2]
        h0, w0 = record.shape
        boxes = record.boxes.copy()
        xyxy = np.empty_like(boxes)
        xyxy[:, [0, 2]] = (boxes[:, [0]] + np.array([-0.5, 0.5], np.float32) * boxes[:, [2]]) * w
        xyxy[:, [1, 3]] = (boxes[:, [1]] + np.array([-0.5, 0.5], np.float32) * boxes[:, [3]]) * h
        return {"img": img, "cls": record.cls, "boxes": xyxy, "im_file": record.im_file,
                "ori_shape": (h0, w0), "ratio_pad": ((h / h0, w / w0), (0, 0))}

    def _remember(self, index: int, img: np.ndarray) -> None:
        self._recent[index] = img
        self._recent_bytes += img.nbytes
        while len(self._recent) > self._recent_budget or self._recent_bytes > RECENT_MAX_BYTES:
            self._recent_bytes -= self._recent.popitem(last=False)[1].nbytes

    def _read(self, index: int) -> np.ndarray:
        """The original decoded RGB image, upright (from the disk cache when it is fresh)."""
        record = self.records[index]
        npy = _npy_path(record.im_file)
        if self.cache == "disk" and npy.exists() and npy.stat().st_mtime >= Path(record.im_file).stat().st_mtime:
            try:
                return np.load(npy)
            except (OSError, ValueError):
                pass  # a damaged cache file: decode the image again
        return decode_image(record.im_file, record.orientation)

    def _resize(self, img: np.ndarray) -> np.ndarray:
        h0, w0 = img.shape[:2]
        r = self.imgsz / max(h0, w0)
        if r == 1:
            return img
        size = (min(math.ceil(w0 * r), self.imgsz), min(math.ceil(h0 * r), self.imgsz))
        return cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)

    # ---------------------------------------------------------------------------------------------- set-up
    def _set_rectangles(self) -> None:
        """Sort by aspect ratio and give each batch the smallest stride-multiple shape its images fit (ultralytics)."""
        ar = np.array([r.shape[0] / r.shape[1] for r in self.records])
        order = ar.argsort(kind="stable")
        self.records = [self.records[i] for i in order]
        ar = ar[order]
        self.batch_index = np.arange(len(ar)) // self.batch_size
        shapes = []
        for b in range(int(self.batch_index[-1]) + 1):
            ari = ar[self.batch_index == b]
            lo, hi = ari.min(), ari.max()
            shapes.append([hi, 1] if hi < 1 else [1, 1 / lo] if lo > 1 else [1, 1])
        self.batch_shapes = (np.ceil(np.array(shapes) * self.imgsz / self.stride + self.pad) * self.stride).astype(int)

    def _fill_cache(self, workers: int) -> None:
        """RAM: keep every resized image. Disk: write missing or stale `NAME.EXT.rgb.npy` files (atomic, DDP-safe)."""
        def ram(i: int) -> None:
            self._ram[i] = self._resize(self._read(i))

        def disk(i: int) -> None:
            im_file = self.records[i].im_file
            npy = _npy_path(im_file)
            if npy.exists() and npy.stat().st_mtime >= Path(im_file).stat().st_mtime:
                return
            img = decode_image(im_file, self.records[i].orientation)
            tmp = npy.with_name(f".{npy.name}.{os.getpid()}.tmp.npy")
            try:
                np.save(tmp, img, allow_pickle=False)
                os.replace(tmp, npy)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise DataError(f"{npy}: cannot write the disk cache ({e}); use cache='ram' or cache=False") from None

        with ThreadPoolExecutor(max(1, workers)) as pool:
            list(pool.map(ram if self.cache == "ram" else disk, range(len(self.records))))

    def _build_pipeline(self, closed: bool) -> Compose:
        hyp, s = self.hyp, self.imgsz
        if not self.augment:
            return Compose([LetterBox((s, s), scaleup=False)])
        mosaic_on = not closed and not self.rect
        affine = RandomAffine((s, s), degrees=hyp["degrees"], translate=hyp["translate"], scale=hyp["scale"],
                              shear=hyp["shear"], perspective=hyp["perspective"])
        pre = Compose([  # copy-paste after the affine: the same result, on a 4x smaller image
            Mosaic(self.load, s, len(self), p=hyp["mosaic"] if mosaic_on else 0.0),
            affine,
            CopyPaste(hyp["copy_paste"] if not closed else 0.0),
        ])

        def second_sample(rng: np.random.Generator) -> Sample:
            return pre({**self.load(int(rng.integers(len(self)))), "rng": rng})

        return Compose([
            pre,
            MixUp(second_sample, p=hyp["mixup"] if mosaic_on else 0.0),
            RandomHSV(hyp["hsv_h"], hyp["hsv_s"], hyp["hsv_v"]),
            RandomFlip(hyp["flipud"], "vertical"),
            RandomFlip(hyp["fliplr"], "horizontal"),
        ])


def _npy_path(im_file: str) -> Path:
    """The disk cache of an image: its whole name plus `.rgb.npy`, so `x.jpg` and `x.png` never share one."""
    path = Path(im_file)
    return path.with_name(path.name + ".rgb.npy")


def decode_image(im_file: str, orientation: int = 1) -> np.ndarray:
    """RGB uint8 [h, w, 3], upright by the EXIF `orientation` the scan recorded (the shape it recorded), any format.

    OpenCV decodes the pixels as stored and this turns them, since OpenCV's own EXIF handling differs by format and
    version; Pillow decodes what OpenCV cannot, and TIFFs with an orientation (libtiff turns those itself, and
    OpenCV 5.1 fails on quarter turns)."""
    if orientation != 1 and Path(im_file).suffix.lower() in (".tif", ".tiff"):
        return _decode_with_pil(im_file)
    bgr = cv2.imread(im_file, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None:
        return _decode_with_pil(im_file)
    return apply_orientation(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), orientation)


def _decode_with_pil(im_file: str) -> np.ndarray:
    """RGB uint8, upright, by Pillow (the scan's decoder); DataError when it cannot decode the file either."""
    try:
        with Image.open(im_file) as im:
            return np.array(ImageOps.exif_transpose(im).convert("RGB"))
    except Exception as e:
        raise DataError(f"{im_file}: cannot be decoded ({e.__class__.__name__}: {e}); it passed the scan, so it was "
                        "probably changed or removed since: restore it, or remove it and start again") from None


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """An image as stored -> upright by its EXIF orientation (what PIL's ImageOps.exif_transpose and serving do)."""
    turned = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
              5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
              7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}
    return np.ascontiguousarray(turned[orientation](img)) if orientation in turned else img


def _to_item(sample: Sample) -> dict[str, Any]:
    """A transformed sample as tensors: CHW uint8 image and normalised cx cy w h boxes."""
    img = sample["img"]
    h, w = img.shape[:2]
    boxes = sample["boxes"]
    n = len(boxes)
    cxcywh = np.empty((n, 4), np.float32)
    cxcywh[:, 0] = (boxes[:, 0] + boxes[:, 2]) / 2 / w
    cxcywh[:, 1] = (boxes[:, 1] + boxes[:, 3]) / 2 / h
    cxcywh[:, 2] = (boxes[:, 2] - boxes[:, 0]) / w
    cxcywh[:, 3] = (boxes[:, 3] - boxes[:, 1]) / h
    return {
        "img": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
        "cls": torch.from_numpy(np.asarray(sample["cls"], np.float32).reshape(n, 1)),
        "bboxes": torch.from_numpy(cxcywh),
        "im_file": sample["im_file"],
        "ori_shape": tuple(sample["ori_shape"]),
        "ratio_pad": sample["ratio_pad"],
    }


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Items -> one batch dict (see the module docstring). Images of different sizes are padded bottom-right to the
    largest (value 114) and their boxes renormalised, so any sampler order makes a valid batch."""
    H = max(int(it["img"].shape[1]) for it in items)
    W = max(int(it["img"].shape[2]) for it in items)
    imgs, boxes = [], []
    for it in items:
        img, b = it["img"], it["bboxes"]
        h, w = img.shape[1:]
        if (h, w) != (H, W):
            img = torch.nn.functional.pad(img, (0, W - w, 0, H - h), value=114)
            b = b * torch.tensor([w / W, h / H, w / W, h / H])
        imgs.append(img)
        boxes.append(b)
    return {
        "img": torch.stack(imgs),
        "batch_idx": torch.cat([torch.full((len(it["cls"]),), float(i)) for i, it in enumerate(items)]),
        "cls": torch.cat([it["cls"] for it in items]),
        "bboxes": torch.cat(boxes),
        "im_file": [it["im_file"] for it in items],
        "ori_shape": [it["ori_shape"] for it in items],
        "ratio_pad": [it["ratio_pad"] for it in items],
    }
