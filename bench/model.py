"""CPU forward latency of our YOLOv12 beside ultralytics' on the same weights.

Both models are built from the same random initialisation (ultralytics' yolo12{n,s}, its state
dict loaded into our v1 model), fused, in eval mode, with the same thread count, and timed in
alternation in one process. Each runs as its own CPU inference runs it: ours channels_last (as
engines/pytorch.py does), ultralytics NCHW. Ratio = ours / theirs (goal <= 1.0). Our NCHW and turbo
columns are for reference (ultralytics has no turbo model).

    python bench/model.py [--threads 2] [--repeats 20]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, machine, table, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--scales", default="n,s")
    parser.add_argument("--sizes", default="320,640")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # ultralytics sets 1 on import when unset
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp())

    import torch
    from ultralytics.nn.tasks import DetectionModel as UltralyticsModel

    from trainer.nn import build_model

    torch.set_num_threads(args.threads)
    rows = []
    for scale in args.scales.split(","):
        torch.manual_seed(0)
        theirs = UltralyticsModel(f"yolo12{scale}.yaml", verbose=False).eval()
        ours = build_model(f"yolov12{scale}-v1.yaml").eval()
        ours.load_state_dict(theirs.state_dict())
        turbo = build_model(f"yolov12{scale}.yaml").eval().fuse().to(memory_format=torch.channels_last)
        theirs.fuse(verbose=False)
        ours_nchw = ours.fuse()
        ours = copy.deepcopy(ours_nchw).to(memory_format=torch.channels_last)
        for size in (int(s) for s in args.sizes.split(",")):
            x = torch.rand(1, 3, size, size)
            xc = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                diff = (theirs(x)[0] - ours(xc)).abs().max().item()
                runs = {name: (lambda m=m, inp=inp: m(inp)) for name, m, inp in (
                    ("ours", ours, xc), ("theirs", theirs, x), ("nchw", ours_nchw, x), ("turbo", turbo, xc))}
                t = interleaved(runs, repeats=args.repeats)
            rows.append([f"yolov12{scale} v1", size, t["ours"] * 1e3, t["theirs"] * 1e3, t["ours"] / t["theirs"],
                         t["nchw"] * 1e3, t["turbo"] * 1e3, f"{diff:.1e}"])
            print(rows[-1], flush=True)
    text = (f"Machine: {machine()}; torch {torch.__version__}, {args.threads} threads, batch 1, fp32, fused.\n\n"
            + table(["model", "imgsz", "ours ms", "ultralytics ms", "ratio ours/theirs", "ours NCHW ms",
                     "ours turbo ms", "max abs diff"], rows) + "\n")
    print(text)
    print(f"written to {write_result('model.md', text)}")


if __name__ == "__main__":
    main()
