"""Training on this CPU beside ultralytics: images/s, peak memory, and convergence.

Each run is a fresh subprocess (so peak RSS is its own) with the same threads, data, model
(yolov12n v1 = ultralytics yolo12n), image size, batch and seed. Speed is timed over whole
training epochs after the first (data loading, forward, loss, backward, step; no validation).

    python bench/train.py speed     [--imgsz 320 --batch 8 --images 160]
    python bench/train.py converge  [--imgsz 256 --batch 16 --images 300 --epochs 30]

Goals: images/s ratio ours/theirs >= 1.0; peak RSS with checkpointing <= 0.6x theirs at the same
batch; mAP50-95 after the same epochs >= theirs - 0.01.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))
from _common import machine, table, write_result

OURS = textwrap.dedent("""
    import json, resource, sys, time
    from trainer import YOLO
    from trainer.hooks import HookBase
    a = json.loads(sys.argv[1])
    def rss_gb():
        return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 1e9
    class EpochTimer(HookBase):  # first batch to last step, so validation is not counted
        times, start_rss = [], [0.0]
        def before_train(self): self.start_rss[0] = rss_gb()
        def before_epoch(self): self.t0 = time.perf_counter()
        def after_step(self): self.t1 = time.perf_counter()
        def after_epoch(self): self.times.append(self.t1 - self.t0)
    timer = EpochTimer()
    m = YOLO("yolov12n-v1.yaml")
    metrics = m.train(data=a["data"], epochs=a["epochs"], imgsz=a["imgsz"], batch=a["batch"], workers=a["workers"],
                      seed=0, project=a["project"], name="ours", exist_ok=True, plots=False, verbose=False,
                      val=a["val"], grad_checkpointing=a["ckpt"], nbs=a.get("nbs", 64), hooks=[timer])
    print(json.dumps({"epoch_s": timer.times, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                      "start_rss_gb": timer.start_rss[0],
                      "map": metrics.get("mAP50-95"), "map50": metrics.get("mAP50")}))
""")

THEIRS = textwrap.dedent("""
    import json, resource, sys, time
    from ultralytics import YOLO
    a = json.loads(sys.argv[1])
    def rss_gb():
        return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 1e9
    times, t0, start_rss = [], [0.0], [0.0]
    m = YOLO("yolo12n.yaml")
    m.add_callback("on_train_start", lambda t: start_rss.__setitem__(0, rss_gb()))
    m.add_callback("on_train_epoch_start", lambda t: t0.__setitem__(0, time.perf_counter()))
    m.add_callback("on_train_epoch_end", lambda t: times.append(time.perf_counter() - t0[0]))
    m.train(data=a["data"], epochs=a["epochs"], imgsz=a["imgsz"], batch=a["batch"], workers=a["workers"], seed=0,
            device="cpu", project=a["project"], name="theirs", exist_ok=True, plots=False, verbose=False,
            val=a["val"], amp=False)
    metrics = m.val(data=a["data"], imgsz=a["imgsz"], batch=a["batch"], device="cpu", plots=False,
                    verbose=False) if a["val"] else None
    print(json.dumps({"epoch_s": times, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                      "start_rss_gb": start_rss[0],
                      "map": metrics.box.map if metrics else None, "map50": metrics.box.map50 if metrics else None}))
""")


def run(script: str, args: dict, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "YOLO_OFFLINE": "1",
           "YOLO_CONFIG_DIR": os.environ.get("YOLO_CONFIG_DIR", tempfile.mkdtemp())}
    out = subprocess.run([sys.executable, "-c", script, json.dumps(args)], capture_output=True, text=True, env=env,
                         timeout=24 * 3600)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["speed", "converge"])
    parser.add_argument("--imgsz", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    speed = args.mode == "speed"
    imgsz = args.imgsz or (320 if speed else 256)
    batch = args.batch or (8 if speed else 16)
    images = args.images or (200 if speed else 300)
    epochs = args.epochs or (3 if speed else 30)

    from trainer.data import synthesize

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    data = synthesize(work / "data", images=images, imgsz=imgsz, seed=0)
    base = {"data": str(data), "imgsz": imgsz, "batch": batch, "epochs": epochs, "workers": args.workers,
            "project": str(work / "runs"), "val": not speed, "ckpt": "off"}
    results = {"theirs": run(THEIRS, base, args.threads), "ours": run(OURS, base, args.threads)}
    if speed:
        results["ours, checkpointing"] = run(OURS, {**base, "ckpt": "on"}, args.threads)
    elif batch < 64:  # below the nominal batch both accumulate to 64 images a step; --nbs BATCH steps every batch
        results[f"ours, --nbs {batch}"] = run(OURS, {**base, "nbs": batch}, args.threads)
    n_train = len(list((Path(data).parent / "images" / "train").iterdir()))
    rows, ref = [], results["theirs"]

    def ips(r: dict) -> float:
        timed = r["epoch_s"][1:] or r["epoch_s"]  # the first epoch pays one-off set-up
        return n_train * len(timed) / sum(timed)

    def training_gb(r: dict) -> float:  # what training itself adds: peak RSS over RSS once model and data are built
        return r["peak_rss_gb"] - r["start_rss_gb"]

    for name, r in results.items():
        row = [name, ips(r), ips(r) / ips(ref), r["peak_rss_gb"], training_gb(r), training_gb(r) / training_gb(ref)]
        if not speed:
            row += [r["map"], r["map50"], r["map"] - ref["map"]]
        rows.append(row)
    headers = ["run", "images/s", "ratio vs ultralytics", "peak RSS GB", "training memory GB",
               "training memory ratio"]
    if not speed:
        headers += ["mAP50-95", "mAP50", "mAP50-95 - theirs"]
    text = (f"Machine: {machine()}; {args.threads} threads; yolov12n (v1) = ultralytics yolo12n, {images} synthetic "
            f"images ({n_train} train), imgsz {imgsz}, batch {batch}, {epochs} epochs, workers {args.workers}.\n\n"
            + table(headers, rows) + "\n\nTraining memory = peak RSS minus the RSS when training starts (model, data "
            "and optimizer built): the activations, gradients and optimizer state, without the Python and torch "
            "runtime that both processes carry alike.\n")
    print(text)
    print(f"written to {write_result(f'train_{args.mode}.md', text)}")


if __name__ == "__main__":
    main()
