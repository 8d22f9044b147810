"""In-process prediction: `Predictor(weights).predict(source, stream=True)`, and `YOLO(...).predict` in the trainer.

    from yolov12_serve.predict import Predictor
    with Predictor("best.onnx", device="cpu") as p:
        for r in p.predict("inspection/*.jpg", stream=True, conf=0.4):
            print(r.path, r.boxes.xyxy, [r.names[c] for c in r.boxes.cls])

Where it lives and why: it runs the server's engines, letterboxing, scheduler and device workers (one
library, two front doors), so it belongs beside them in `yolov12_serve`, whose imports go one way
(`yolov12_serve -> engines`) and never reach torch on the ONNX path. `trainer.YOLO.predict` imports it
lazily, when called: importing the trainer does not import the server, and the server never imports the
trainer (a `.pt` engine does, as `engines.pytorch` always has).

Offline inputs (image files, folders, globs, video files, numpy arrays, PIL images) are read as fast as
the engines take them and every frame is answered, in order; live inputs (rtsp:// cameras) keep the
server's newest-frame-wins behaviour. Arrays are RGB uint8 [H, W, 3] (OpenCV's BGR must be flipped:
`frame[..., ::-1]`). See `pipeline.py` for how frames flow, `inputs.py` for what is accepted and
`results.py` for what comes back; `yolov12-predict` is the command line (`cli.py`).
"""

from .inputs import SourceError
from .pipeline import PredictError, Predictor
from .results import Boxes, Result

__all__ = ["Boxes", "PredictError", "Predictor", "Result", "SourceError"]
