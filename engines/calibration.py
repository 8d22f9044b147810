"""INT8 calibration data for TensorRT: the dataset's images letterboxed exactly as frames are at run time.

`CalibrationBatches` turns image files into uint8 NHWC batches (numpy, testable without a GPU);
`make_calibrator` wraps them in TensorRT's IInt8EntropyCalibrator2 with a reusable cache file:
once the cache exists, later builds (another batch size, FP16 fallback tweaks) skip calibration.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .base import EngineError
from .letterbox import plan_letterbox

__all__ = ["CalibrationBatches", "letterbox_frame", "make_calibrator"]


def letterbox_frame(image: np.ndarray, input_hw: tuple[int, int], fill: int = 114) -> np.ndarray:
    """uint8 HxWx3 RGB -> uint8 input_hw x 3: aspect kept (bilinear resize), centred, grey borders."""
    lb = plan_letterbox(image.shape[:2], input_hw)
    if lb.new_hw != image.shape[:2]:
        image = np.asarray(Image.fromarray(image).resize((lb.new_hw[1], lb.new_hw[0]), Image.BILINEAR))
    return lb.place(image, fill)


class CalibrationBatches:
    """Batches of `batch` letterboxed images at `input_hw`, from at most `limit` files spread over `files`."""

    def __init__(self, files: Sequence[str | Path], input_hw: tuple[int, int], batch: int = 8,
                 limit: int = 512, exact_batch: bool = False) -> None:
        """`exact_batch`: the batch is the engine profile's (TensorRT reads that many frames per pointer), so
        fewer images than `batch` is an error instead of a smaller batch."""
        files = [Path(f) for f in files]
        if not files:
            raise EngineError("no calibration images: --data must name a dataset with images (its val split is used)")
        if exact_batch and len(files) < batch:
            raise EngineError(f"INT8 calibration runs at the engine's batch {batch} and the dataset has {len(files)} "
                              f"images: add images, or build with --batch {len(files)} or less")
        if len(files) > limit:  # an even spread, not the first folder's worth
            files = [files[round(i * (len(files) - 1) / (limit - 1))] for i in range(limit)] if limit > 1 else files[:1]
        self.files, self.input_hw, self.batch = files, input_hw, max(1, min(batch, len(files)))

    def __len__(self) -> int:
        return len(self.files) // self.batch

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            chunk = self.files[i * self.batch:(i + 1) * self.batch]
            yield np.stack([letterbox_frame(self._read(f), self.input_hw) for f in chunk])

    @staticmethod
    def _read(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
        except OSError as e:
            raise EngineError(f"calibration image {path} is unreadable ({e}): fix or remove it") from None


def make_calibrator(trt: Any, batches: CalibrationBatches, cache_file: str | Path, device: Any,
                    nhwc: bool = True) -> Any:
    """A TensorRT IInt8EntropyCalibrator2 feeding `batches` from one CUDA buffer (uint8 NHWC frames for our
    exports, float NCHW in 0..1 for raw-head ones); reads/writes `cache_file`. An error while reading the images
    is kept in `.error` (TensorRT only logs what get_batch raises and ends calibration early): re-raise it."""
    import torch

    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.cache = Path(cache_file)
            self.batches = iter(batches)
            self.error: Exception | None = None
            h, w = batches.input_hw
            n = batches.batch
            shape, dtype = ((n, h, w, 3), torch.uint8) if nhwc else ((n, 3, h, w), torch.float32)
            self.buffer = torch.empty(shape, dtype=dtype, device=device)

        def get_batch_size(self) -> int:
            return batches.batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            try:
                frames = torch.from_numpy(next(self.batches))
            except StopIteration:
                return None
            except Exception as e:  # an unreadable image: stop calibrating, and say so after the build
                self.error = e
                return None
            self.buffer.copy_(frames if nhwc else frames.to(device).permute(0, 3, 1, 2).float().div_(255))
            torch.cuda.current_stream(device).synchronize()
            return [int(self.buffer.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return self.cache.read_bytes() if self.cache.is_file() else None

        def write_calibration_cache(self, cache: Any) -> None:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            self.cache.write_bytes(bytes(cache))

    return _EntropyCalibrator()
