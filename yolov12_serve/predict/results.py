"""What `predict` yields: one `Result` per frame, its `Boxes` in source-frame pixels, and drawing them.

Images are RGB throughout, as everywhere in this project (engines take RGB, `orig_img` and `plot()` give
RGB): unlike ultralytics, whose arrays are OpenCV's BGR. `Image.fromarray(result.plot())` saves as seen.
A result does not copy its frame: `orig_img` is produced when first asked for (image files are decoded
again at full size, video frames converted from the decoder's YUV), so a stream of results that are never
drawn costs no full-size RGB frame each.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..drawing import draw_boxes

__all__ = ["Boxes", "Result", "draw_boxes"]


class Boxes:
    """Detections of one frame: `data` float32 [n, 6] = x1, y1, x2, y2 (source pixels), score, class; with
    `predict(track=True)` also `id` [n] int64, each object's track id (0 for one seen in one frame so far).

    numpy arrays, not torch tensors (the ONNX path imports no torch). Indexing and iterating give `Boxes` too, as
    ultralytics': `for box in r.boxes: x1, y1, x2, y2 = box.xyxy[0]`; `r.boxes[r.boxes.conf > 0.5]`.
    """

    __slots__ = ("data", "id", "orig_shape")

    def __init__(self, data: np.ndarray, orig_shape: tuple[int, int], ids: np.ndarray | None = None) -> None:
        self.data = np.asarray(data, dtype=np.float32).reshape(-1, 6)
        self.orig_shape = orig_shape  # (h, w) of the source frame
        self.id = None if ids is None else np.asarray(ids, dtype=np.int64).reshape(-1)

    def __getitem__(self, index: int | slice | np.ndarray | list[int]) -> Boxes:
        """The boxes at `index` (an int gives one box, still [1, 6]), their track ids with them."""
        ids = None if self.id is None else self.id[index]
        return Boxes(self.data[index], self.orig_shape, ids)

    def __iter__(self) -> Iterator[Boxes]:
        return (self[i] for i in range(len(self)))

    @property
    def shape(self) -> tuple[int, ...]:
        """Of `data`: (n, 6)."""
        return self.data.shape

    @property
    def is_track(self) -> bool:
        """Whether the boxes carry track ids (predict's `track=True`)."""
        return self.id is not None

    @property
    def xyxy(self) -> np.ndarray:
        """[n, 4] corners in source pixels."""
        return self.data[:, :4]

    @property
    def conf(self) -> np.ndarray:
        """[n] scores."""
        return self.data[:, 4]

    @property
    def cls(self) -> np.ndarray:
        """[n] class indices (int64)."""
        return self.data[:, 5].astype(np.int64)

    @property
    def xywh(self) -> np.ndarray:
        """[n, 4] centre x, centre y, width, height in source pixels."""
        x1, y1, x2, y2 = self.xyxy.T
        return np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=1)

    @property
    def xyxyn(self) -> np.ndarray:
        """[n, 4] corners as fractions of the frame's width and height."""
        h, w = self.orig_shape
        return self.xyxy / np.array([w, h, w, h], np.float32)

    @property
    def xywhn(self) -> np.ndarray:
        """[n, 4] `xywh` as fractions of the frame's width and height."""
        h, w = self.orig_shape
        return self.xywh / np.array([w, h, w, h], np.float32)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"Boxes({len(self)} in a {self.orig_shape[1]}x{self.orig_shape[0]} frame)"


@dataclass(eq=False)
class Result:
    """One frame's detections, where the frame came from, and how long each step took.

    `source` is what was named (a path, a folder, a URL with any password masked, 'array0'); `path` the file
    the frame came from (the image itself for folders and globs); `frame` its index in its source (a video's
    frame number counting every decoded frame, so `vid_stride=2` gives 0, 2, 4, ...; a camera's count of frames
    received, so the gaps are frames it skipped as superseded); `time` the frame's position in a video file
    (seconds), or a camera's capture time (seconds since the epoch); `speed` milliseconds per step:
    'preprocess' (decode and letterbox; a camera's decode runs in its reader and is not counted),
    'inference' (the engine run divided by the frames of its batch), 'postprocess' (boxes to results) and
    'batch' (frames in that engine run).
    """

    boxes: Boxes
    names: dict[int, str]
    source: str
    path: str
    frame: int
    orig_shape: tuple[int, int]
    speed: dict[str, float]
    device: str = "cpu"
    time: float | None = None
    picture: Callable[[], np.ndarray] | np.ndarray | None = field(default=None, repr=False)

    @property
    def orig_img(self) -> np.ndarray:
        """The source frame, RGB uint8 [H, W, 3] (made when first asked for, then kept)."""
        if self.picture is None:
            raise ValueError(f"{self.source} frame {self.frame}: this source does not keep its frames")
        if callable(self.picture):
            self.picture = np.asarray(self.picture())
        return self.picture

    def __len__(self) -> int:
        return len(self.boxes)

    def summary(self, decimals: int = 2) -> list[dict[str, Any]]:
        """One dict per detection: name, class, confidence, box (x1, y1, x2, y2 in source pixels), and track_id
        when tracked."""
        out = []
        for i, (x1, y1, x2, y2, score, c) in enumerate(self.boxes.data.tolist()):
            out.append({"name": self.names.get(int(c), str(int(c))), "class": int(c),
                        "confidence": round(score, 5),
                        "box": {k: round(v, decimals) for k, v in zip(("x1", "y1", "x2", "y2"), (x1, y1, x2, y2))}})
            if self.boxes.id is not None:
                out[-1]["track_id"] = int(self.boxes.id[i])
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain data: source, path, frame, time, shape [h, w], device, speed (ms) and the detections."""
        return {"source": self.source, "path": self.path, "frame": self.frame, "time": self.time,
                "shape": list(self.orig_shape), "device": self.device,
                "speed": {k: round(v, 3) for k, v in self.speed.items()}, "detections": self.summary()}

    def to_json(self, indent: int | None = None) -> str:
        """`to_dict()` as JSON."""
        return json.dumps(self.to_dict(), indent=indent)

    def plot(self, labels: bool = True, conf: bool = True, line_width: int | None = None) -> np.ndarray:
        """A copy of the frame (RGB) with the boxes drawn, labelled 'name 0.87' ('#12 name 0.87' when tracked)."""
        return draw_boxes(self.orig_img, self.boxes.data, self.names, labels=labels, conf=conf, line_width=line_width,
                          ids=self.boxes.id)

    def save(self, filename: str | Path | None = None) -> str:
        """Write `plot()` to `filename` (format from its suffix; a folder: the default name in it); returns the path
        written. Default, as ultralytics: 'results_NAME' for an image, 'results_STEM_FRAME.jpg' for a video or camera
        frame, in the working directory. Never over the source image itself (it used to be the default)."""
        p = Path(self.path)
        still = p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
        default = f"results_{p.name}" if still else f"results_{p.stem or 'frame'}_{self.frame:06d}.jpg"
        target = Path(default) if filename is None else Path(filename)
        if target.is_dir():
            target = target / default
        if target.suffix.lower() not in Image.registered_extensions():
            raise ValueError(f"cannot save {target}: name a picture file (.jpg, .png, ...) or a folder")
        if still and p.is_file() and target.resolve() == p.resolve():
            raise ValueError(f"saving to {target} would overwrite the source image: give another name")
        Image.fromarray(self.plot()).save(target)
        return str(target)

    def __repr__(self) -> str:
        return (f"Result({self.source!r} frame {self.frame}: {len(self)} detections in {self.orig_shape[1]}x"
                f"{self.orig_shape[0]}, {self.speed.get('inference', 0):.1f} ms inference on {self.device})")
