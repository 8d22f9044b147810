"""`yolov12-predict`: detections on images, folders, globs, videos and cameras from the command line.

    yolov12-predict --weights best.onnx --source parts/ --save runs/predict
    yolov12-predict --weights best.onnx --source line3.mp4 --save out --save-json out/line3.json
    yolov12-predict --weights best.onnx --source rtsp://cam7/stream --duration 60 --save out

--save DIR writes each image annotated under its own name, each video and camera as DIR/NAME.mp4 (H.264,
the frames' own timing); --save-json F writes one JSON array with an object per frame (Result.to_dict), as
the results come. A progress bar counts the offline frames. A bad argument or source is one line on stderr
and exit status 2; a failing engine exit 1; Ctrl-C stops cleanly (files closed) with 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any, TextIO

from .. import __version__
from ..argparsing import OneLineParser
from .inputs import IMAGE_SUFFIXES, SourceError, resolve_sources
from .results import Result

__all__ = ["main"]


class _Parser(OneLineParser):
    error_format = "{prog}: {message}"


def _imgsz(text: str) -> int | tuple[int, int]:
    parts = [p for p in re.split(r"[,x ]", text) if p]
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected N or H,W, got {text!r}")
    return int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1]))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="yolov12-predict", description="Detect objects in images, folders, globs, videos and rtsp:// "
                "cameras with an .onnx, .engine or .pt model.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--weights", required=True, help="model: .onnx (ONNX Runtime), .engine (TensorRT) or .pt")
    p.add_argument("--source", required=True, nargs="+", help="image, folder, glob, video, rtsp:// URL (several: "
                   "one after another; cameras at once)")
    p.add_argument("--save", metavar="DIR", help="write annotated images and videos here")
    p.add_argument("--save-json", metavar="FILE", help="write every frame's detections as one JSON array")
    p.add_argument("--imgsz", type=_imgsz, help="largest engine input, N or H,W (default: the model's)")
    p.add_argument("--conf", type=float, help="score threshold (default: the model's, 0.25 unless exported otherwise)")
    p.add_argument("--iou", type=float, help="NMS IoU threshold (default: the model's)")
    p.add_argument("--classes", type=int, nargs="+", help="keep only these class indices")
    p.add_argument("--max-det", type=int, help="most detections per frame (default: the model's)")
    p.add_argument("--batch", type=int, default=1, help="frames per engine run (default: 1)")
    p.add_argument("--device", help="cpu, cpu:N, 0, 0,1,2,3 (default: the first GPU the engine can use, else cpu)")
    p.add_argument("--half", action="store_true", help="fp16 where the engine allows (a .pt on a GPU)")
    p.add_argument("--vid-stride", type=int, default=1, help="every Nth frame of videos and cameras (default: 1)")
    p.add_argument("--track", action="store_true",
                   help="follow each object through its video or camera: a track id per box (drawn as #ID, "
                   "'track_id' in --save-json) and the objects counted")
    p.add_argument("--instances", type=int,
                   help="engine instances per device (default: 2; 1 for a .pt on a CPU, or on one core)")
    p.add_argument("--duration", type=float, help="stop after this many seconds (cameras never end on their own)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from engines import EngineError

    from .pipeline import PredictError, Predictor

    try:
        sources = resolve_sources(args.source)
        if args.duration is not None and args.duration <= 0:
            raise ValueError(f"--duration must be positive, got {args.duration}")
        # a bad path is one line at once, before the engine loads; tried, then taken back: nothing is left behind
        # when the model then fails to load
        for flag, path, kind in (("--save", args.save, _Saver), ("--save-json", args.save_json, _JsonArray)):
            probe = _output(flag, path, kind)
            if probe is not None:
                probe.close(keep=False)
    except (SourceError, ValueError) as e:
        return _fail(e, 2)
    try:
        predictor = Predictor(args.weights, device=args.device, instances=args.instances, half=args.half,
                              max_batch=max(32, args.batch))
    except (EngineError, ValueError) as e:
        return _fail(e, 2)
    saver = json_out = None
    try:
        saver = _output("--save", args.save, _Saver)
        json_out = _output("--save-json", args.save_json, _JsonArray)
    except ValueError as e:  # the path changed since it was tried
        if saver is not None:
            saver.close(keep=False)
        predictor.close()
        return _fail(e, 2)
    bar = results = None
    finished = False  # True: the outputs are kept (a full run, or one the user stopped); False: taken back
    t0 = time.perf_counter()
    frames = detections = 0
    objects: set[tuple[str, int]] = set()  # (source, track id) with --track
    try:
        results = predictor.predict(sources, stream=True, imgsz=args.imgsz, conf=args.conf, iou=args.iou,
                                    classes=args.classes, max_det=args.max_det, batch=args.batch,
                                    vid_stride=args.vid_stride, track=args.track)
        if sources.offline and not args.no_progress:
            bar = _progress(sources.total(args.vid_stride))
        live = {i.name for i in sources.live}
        for r in results:
            frames += 1
            detections += len(r)
            if r.boxes.id is not None:
                objects.update((r.source, int(i)) for i in r.boxes.id if i)
            if saver is not None:
                saver.add(r)
            if json_out is not None:
                json_out.add(r.to_dict())
            if bar is not None and r.source not in live:
                bar.update(1)
            if args.duration is not None and time.perf_counter() - t0 >= args.duration:
                break
        finished = True
    except (SourceError, ValueError) as e:
        return _fail(e, 2)
    except (PredictError, EngineError) as e:
        return _fail(e, 1)
    except KeyboardInterrupt:  # how a camera run ends: what it saved is kept
        finished = True
        sys.stderr.write("yolov12-predict: interrupted\n")
        return 130
    finally:
        if results is not None:
            results.close()  # stops the reader, the cameras and the workers before the engines are freed
        if bar is not None:
            bar.close()
        # the JSON first (its FILE.tmp may sit in the --save folder); the results of a run that failed part-way
        # are kept (the error line says where it stopped), an empty one is taken back
        for closer in (json_out, saver):
            if closer is not None:
                closer.close(keep=finished or (closer is json_out and json_out.n > 0))
        predictor.close()
    seconds = time.perf_counter() - t0
    where = f"; saved to {args.save}" if args.save else ""
    counted = f", {len(objects)} objects" if args.track else ""
    print(f"{frames} frames, {detections} detections{counted} in {seconds:.1f} s "
          f"({frames / max(seconds, 1e-9):.1f} frames/s){where}")
    return 0


def _fail(e: BaseException, code: int) -> int:
    sys.stderr.write(f"yolov12-predict: {str(e).splitlines()[0] if str(e) else type(e).__name__}\n")
    return code


def _progress(total: int | None) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="frame", desc="predict", dynamic_ncols=True)


def _output(flag: str, path: str | None, open_it: Callable[[Path], Any]) -> Any:
    """`open_it(Path(path))` (None without a path), or ValueError naming the flag when it cannot be written there."""
    if not path:
        return None
    try:
        return open_it(Path(path))
    except FileExistsError:
        raise ValueError(f"{flag} {path} is a file: give a folder") from None
    except IsADirectoryError:
        raise ValueError(f"{flag} {path} is a folder: give a file name") from None
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write {e.filename or path}: {e.strerror or e}") from None


def _make_dirs(folder: Path) -> list[Path]:
    """`folder.mkdir(parents=True, exist_ok=True)`; returns the folders it created, outermost first."""
    missing = [d for d in (folder, *folder.parents) if not d.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders `_make_dirs` created, innermost first, while they are still empty."""
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:  # something was written there: keep it
            break


class _JsonArray:
    """A JSON array written one element at a time to FILE.tmp, renamed to FILE when the run ends well: a failed run
    leaves no valid-looking empty or torn FILE (and an earlier FILE stays as it was)."""

    def __init__(self, path: Path) -> None:
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory", str(path))
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.created = _make_dirs(path.parent)
        try:
            self.f: TextIO = open(self.tmp, "w")  # noqa: SIM115 - closed by close()
        except OSError:
            _remove_empty(self.created)
            raise
        self.f.write("[")
        self.n = 0

    def add(self, obj: dict[str, Any]) -> None:
        self.f.write(("\n" if self.n == 0 else ",\n") + json.dumps(obj))
        self.n += 1

    def close(self, keep: bool = True) -> None:
        """Finish the array and put it in place (`keep`), or delete it and the folders made for it."""
        if keep:
            self.f.write("\n]\n")
            self.f.close()
            self.tmp.replace(self.path)
            return
        self.f.close()
        self.tmp.unlink(missing_ok=True)
        _remove_empty(self.created)


class _Saver:
    """Annotated output: an image per image, an H.264 .mp4 per video or camera (frames at their own times)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.created = _make_dirs(folder)
        self.videos: dict[str, _VideoWriter] = {}
        self.used: set[str] = set()

    def _name(self, name: str) -> Path:
        stem, suffix = Path(name).stem, Path(name).suffix
        candidate, k = name, 1
        while candidate in self.used:
            candidate = f"{stem}_{k}{suffix}"
            k += 1
        self.used.add(candidate)
        return self.folder / candidate

    def add(self, r: Result) -> None:
        path = Path(r.path)
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            r.save(self._name(path.name))
            return
        writer = self.videos.get(r.source)
        if writer is None:
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem if path.is_file() else r.source.split("://")[-1])
            writer = self.videos[r.source] = _VideoWriter(self._name(f"{stem.strip('_') or 'camera'}.mp4"))
        writer.add(r.plot(), r.time)

    def close(self, keep: bool = True) -> None:
        """Finish the videos; without `keep` (a failed run) also remove the folders made for it if nothing was saved."""
        for w in self.videos.values():
            w.close()
        if not keep:
            _remove_empty(self.created)


class _VideoWriter:
    """H.264 in .mp4 with PyAV; each frame at its own time (milliseconds), so dropped or skipped frames keep timing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.out: Any = None
        self.stream: Any = None
        self.t0: float | None = None
        self.last = -1

    def add(self, rgb: Any, t: float | None) -> None:
        import av

        h, w = (rgb.shape[0] // 2) * 2, (rgb.shape[1] // 2) * 2  # yuv420p wants even sizes
        if self.out is None:
            self.out = av.open(str(self.path), "w")
            self.stream = self.out.add_stream("libx264", rate=25)
            self.stream.width, self.stream.height, self.stream.pix_fmt = w, h, "yuv420p"
            self.stream.time_base = Fraction(1, 1000)
            self.stream.options = {"preset": "veryfast"}
        if self.t0 is None:
            self.t0 = t or 0.0
        ms = round(((t or 0.0) - self.t0) * 1000) if t is not None else self.last + 40
        ms = max(ms, self.last + 1)  # strictly increasing
        self.last = ms
        frame = av.VideoFrame.from_ndarray(rgb[:h, :w], format="rgb24")
        frame.pts, frame.time_base = ms, Fraction(1, 1000)
        self.out.mux(self.stream.encode(frame))

    def close(self) -> None:
        if self.out is not None:
            self.out.mux(self.stream.encode())
            self.out.close()
            self.out = None


if __name__ == "__main__":
    sys.exit(main())
