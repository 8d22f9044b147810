"""`YOLO`: the handle on a model (build, load, train, validate, export, predict), as ultralytics users expect.

`YOLO("best.onnx")` and `YOLO("best.engine")` open an exported engine for prediction only; such a handle has no
PyTorch model, so train / val / export say so. Opening one imports neither torch nor the server: `predict`
imports the server's predictor (yolov12_serve.predict) when called, and that path never imports torch for
an ONNX engine.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engines import EngineInfo
    from yolov12_serve.predict import Predictor, Result

    from .checkpoint import Checkpoint
    from .nn import DetectionModel

__all__ = ["YOLO"]

ENGINE_SUFFIXES = (".onnx", ".engine", ".plan")


class YOLO:
    """`YOLO("yolov12s.yaml")` builds a fresh model; `YOLO("best.pt")` loads ours, official or ultralytics weights;
    `YOLO("best.onnx")` / `YOLO("best.engine")` opens an exported engine for `predict` only.

    `.model` is the `nn.Module`; its eval-mode forward on float [B,3,H,W] in 0..1 returns [B, 4+nc, N].
    """

    def __init__(self, model: str | Path | DetectionModel = "yolov12n.yaml", nc: int | None = None,
                 names: dict[int, str] | list[str] | None = None, task: str | None = None) -> None:
        """`task`: taken as ultralytics' (`YOLO("best.onnx", task="detect")`); detection is the only one here."""
        if task not in (None, "detect"):
            raise ValueError(f"task={task!r}: this project's YOLOv12 models detect only; use task='detect' or leave it "
                             "out")
        self.ckpt: Checkpoint | None = None
        self.cfg_yaml: str | None = None  # set while `.model` is a fresh build of a yaml: training rebuilds it seeded
        self.engine: Path | None = None  # an exported engine: prediction only
        self.engine_info: EngineInfo | None = None
        self._model: DetectionModel | None = None
        self._weights_file: tuple[Path, Any] | None = None  # a .pt and the fingerprint `.model` had when read from it
        self._snapshot: tuple[Path, Any] | None = None  # the same for the temporary checkpoint predict wrote last
        self._predictor: tuple[tuple[Any, ...], Predictor] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if isinstance(model, str | Path):
            self.source = str(model)
            text = self.source.lower()
            if text.endswith((".yaml", ".yml", ".pt", ".pth")):
                from . import require_torch

                require_torch(f"YOLO({self.source!r})")
            if text.endswith((".yaml", ".yml")):
                from .nn import build_model

                self.model = build_model(model, nc=nc, names=names)
                self.cfg_yaml = str(model)
            elif text.endswith((".pt", ".pth")):
                from .checkpoint import load_checkpoint

                self.ckpt = load_checkpoint(model)
                self.model = self.ckpt.model
                self._weights_file = (Path(model), _fingerprint(self.model))
            elif text.endswith(ENGINE_SUFFIXES):
                import engines

                self.engine_info = engines.read_info(model)  # missing, empty or corrupt files fail here, clearly
                self.engine = Path(model)
            elif Path(model).is_dir():
                raise ValueError(f"'{model}' is a folder: give a model yaml, a .pt checkpoint or an exported engine "
                                 "(.onnx, .engine) file in it")
            else:
                raise ValueError(f"'{model}': expected a model yaml (yolov12n.yaml ... yolov12x-v1.yaml), a .pt "
                                 "checkpoint, or an exported engine (.onnx, .engine) to predict with")
        else:
            from .nn import DetectionModel

            if not isinstance(model, DetectionModel):
                raise ValueError(f"expected a model yaml, a checkpoint or engine path, or a DetectionModel; got "
                                 f"{type(model).__name__}")
            self.source = "<module>"
            self.model = model

    @property
    def model(self) -> DetectionModel:
        if self._model is None:
            raise ValueError(self._engine_only("has no PyTorch model"))
        return self._model

    @model.setter
    def model(self, value: DetectionModel) -> None:
        self._model = value

    def _engine_only(self, what: str) -> str:
        return (f"YOLO('{self.engine}') is an exported engine, for predict only: it {what}; use the .pt checkpoint "
                "it was exported from (or a model yaml)")

    @property
    def names(self) -> dict[int, str]:
        if self.engine_info is not None:
            return dict(self.engine_info.names)
        return self.model.names

    def info(self, imgsz: int = 640, verbose: bool = True) -> dict[str, Any]:
        """Layers, parameters and GFLOPs at `imgsz` (an engine: its metadata); printed as one line when `verbose`."""
        if self.engine_info is not None:
            e = self.engine_info
            if verbose:
                print(f"{self.engine.name}: YOLOv12-{e.scale or '?'} ({e.variant or '?'}) engine, input up to "
                      f"{e.imgsz[0]}x{e.imgsz[1]}, batch {e.batch[0]}..{e.batch[1]}, {e.precision}, {e.nc} classes")
            return {"engine": str(self.engine), "scale": e.scale, "variant": e.variant, "imgsz": e.imgsz,
                    "batch": e.batch, "precision": e.precision, "nc": e.nc}
        info = self.model.info(imgsz)
        if verbose:
            print(f"YOLOv12-{info['scale'] or '?'} ({info['variant']}): {info['layers']} layers, "
                  f"{info['parameters']:,} parameters, {info['gflops']:.1f} GFLOPs at {imgsz}, {info['nc']} classes")
        return info

    def train(self, **kwargs: Any) -> dict[str, Any]:
        """Train on `data=...yaml` (see `trainer.config.TrainConfig` for every option); returns final metrics."""
        if self.engine is not None:
            raise ValueError(self._engine_only("cannot be trained"))
        from .engine import train

        metrics = train(self, **kwargs)
        self.close()  # engines predict loaded may hold the weights a best.pt at this same path had before
        best = Path(getattr(self, "save_dir", "")) / "weights" / "best.pt"
        if self.ckpt is not None and best.is_file():  # predict reads the trained weights from their file
            self._weights_file = (best, _fingerprint(self.model))
            self.source = str(best)  # what the handle holds now: export() writes best.onnx beside it, as ultralytics
        return metrics

    def val(self, **kwargs: Any) -> dict[str, Any]:
        """Validate on `data=...yaml` (default: the one the checkpoint was trained on); returns a dict with at least
        'mAP50-95' and 'mAP50'."""
        if self.engine is not None:
            raise ValueError(self._engine_only("cannot be validated here"))
        from .validate import val

        _check_keywords("val", kwargs, val)
        return val(self, **kwargs)

    def export(self, format: str = "onnx", **kwargs: Any) -> str:
        """Export to `format` ('onnx' or 'engine'; any case, 'tensorrt'/'trt' too, as ultralytics); returns the
        written path."""
        if self.engine is not None:
            raise ValueError(self._engine_only("is exported already"))
        from .export import export

        _check_keywords("export", kwargs, export)
        if isinstance(format, str):
            format = format.lower()
            format = "engine" if format in ("tensorrt", "trt") else format
        return str(export(self, format=format, **kwargs))

    # ------------------------------------------------------------------------------------------------- predict
    def predict(self, source: Any = None, *, stream: bool = False, device: Any = None, half: bool = False,
                instances: int | None = None, **kwargs: Any) -> Iterator[Result] | list[Result]:
        """Detections for every frame of `source`: a generator of `Result`s when `stream`, else a list.

        `source`: an image path, a folder, a glob, a video file, an rtsp:// URL, an RGB uint8 array [H, W, 3]
        (not OpenCV's BGR: flip it with `frame[..., ::-1]`), a PIL image, or a list of these. Files, folders,
        videos and arrays are read as fast as the engine takes them and every frame is answered in order;
        cameras keep the newest frame (those the engine is too busy for are dropped), so use `stream=True`.
        Keywords: imgsz, conf, iou, classes (ids or names), max_det, batch, vid_stride, track (an id per object:
        `track()`), verbose (taken, as ultralytics', and ignored);
        `device` 'cpu', 'cpu:N', '0', '0,1,2,3' (files are spread over the devices, cameras placed round-robin);
        `half` fp16 where the engine can choose (a .pt on a GPU); `instances` engine instances per device
        (default: 2 on GPUs and for ONNX on a multi-core CPU). Runs the server's engines, scheduler and workers:
        `yolov12_serve.predict`.
        A model built from a yaml, or changed in memory since it was read or last predicted with, is saved to a
        temporary checkpoint first (engines load files); the engines are kept for the next call otherwise.
        """
        _check_predict_keywords(kwargs)  # before the engines load
        batch = kwargs.get("batch", 1)
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
        kwargs.pop("verbose", None)  # ultralytics' flag: nothing is printed per frame here anyway
        weights = self._predict_weights()
        key = (str(weights), str(device), bool(half), instances, max(32, batch))
        if self._predictor is None or self._predictor[0] != key:
            from yolov12_serve.predict import Predictor

            self.close()
            self._predictor = (key, Predictor(weights, device=device, instances=instances, half=half,
                                              max_batch=key[-1]))
        return self._predictor[1].predict(source, stream=stream, **kwargs)

    __call__ = predict

    def track(self, source: Any = None, **kwargs: Any) -> Iterator[Result] | list[Result]:
        """`predict(source, track=True, ...)`: each object keeps one id through the frames of its source
        (`result.boxes.id`; 0 for an object seen in one frame so far), as the server's AddStream track does."""
        return self.predict(source, track=True, **kwargs)

    def _predict_weights(self) -> Path:
        """The file the engines load: the engine, the checkpoint `.model` came from, or a snapshot of `.model`."""
        if self.engine is not None:
            return self.engine
        now = _fingerprint(self.model)
        for saved in (self._weights_file, self._snapshot):
            if saved is not None and saved[1] == now and saved[0].is_file():
                return saved[0]
        from .checkpoint import save_checkpoint

        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="yolov12-predict-")
        path = Path(self._tmp.name) / "model.pt"
        imgsz = self.ckpt.imgsz if self.ckpt is not None else 640
        self.close()  # the engines on the previous snapshot
        save_checkpoint(path, self.model, imgsz=imgsz)
        self._snapshot = (path, now)
        return path

    def close(self) -> None:
        """Free the engines `predict` loaded (they are kept between calls)."""
        if self._predictor is not None:
            self._predictor[1].close()
            self._predictor = None


def _fingerprint(model: Any) -> tuple[Any, ...]:
    """Changes whenever the weights do: every parameter's and buffer's storage and in-place version counter (an
    optimizer step, `zero_()`, `load_state_dict` and `.to()` all change one), without reading the weights."""
    tensors = [*model.parameters(), *model.buffers()]
    return (id(model), *((t.data_ptr(), t._version) for t in tensors))


PREDICT_KEYWORDS = ("imgsz", "conf", "iou", "classes", "max_det", "batch", "vid_stride", "window", "track", "verbose")
_ELSEWHERE = {"save": "save each result with result.save(), or run yolov12-predict --save DIR",
              "save_txt": "write result.to_json() yourself, or run yolov12-predict --save-json FILE",
              "show": "draw with result.plot() (an RGB array) and show it yourself"}


def _check_keywords(call: str, kwargs: dict[str, Any], fn: Any) -> None:
    """TypeError naming the closest keyword `fn` takes (after its first, the model) for one it does not, and all
    of them: Python's "unexpected keyword argument" names neither."""
    import difflib
    import inspect

    params = inspect.signature(fn).parameters.values()
    takes = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][1:]
    for name in kwargs:
        if name not in takes:
            near = difflib.get_close_matches(name, takes, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise TypeError(f"{call}() got an unexpected keyword {name!r}: {hint}it takes {', '.join(takes)}")


def _check_predict_keywords(kwargs: dict[str, Any]) -> None:
    """TypeError naming the keywords predict takes (and where an ultralytics one went) for one it does not know,
    before the engines load (Predictor.predict would say "unexpected keyword argument" only once they had)."""
    import difflib

    for name in kwargs:
        if name in PREDICT_KEYWORDS:
            continue
        if name in _ELSEWHERE:
            raise TypeError(f"predict() takes no {name!r}: {_ELSEWHERE[name]}")
        near = [k for k in PREDICT_KEYWORDS if name.startswith(k)] or difflib.get_close_matches(name, PREDICT_KEYWORDS,
                                                                                                 n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise TypeError(f"predict() got an unexpected keyword {name!r}: {hint}it takes source, stream, device, half, "
                        f"instances, {', '.join(PREDICT_KEYWORDS)}")
