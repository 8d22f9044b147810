"""ONNX Runtime engine throughput, and our end-to-end export beside ultralytics' own ONNX export.

1. images/s against batch size (1..16) at 320 and 640 (yolov12n turbo, our default), one session;
2. images/s against intra-op threads x instances (K sessions driven by K threads) at 320;
3. ours vs ultralytics on the SAME weights (ultralytics yolo12n, its state dict loaded into our v1
   model), each exported by its own exporter, on the same synthetic camera frames, pre- and
   post-processing included on both sides:
     ours:   fit_shape + letterbox (cv2 resize) into uint8 -> engine.infer (NMS in the graph) -> unscale
     theirs: YOLO(their.onnx).predict(frame) (letterbox, /255, NCHW float, ORT, their NMS, rescale)
   Each side runs in its own process with the same threads (ultralytics sets OMP_NUM_THREADS=1 on
   import, so it never shares a process with a timed run) and the two are timed in alternation.
   Ratio = ours / theirs in images/s (goal >= 1.0).

Weights are random but "activated" (BatchNorm statistics measured on synthetic frames, class head
scaled) so every frame has detections and NMS does real work on both sides.

    python bench/engines.py [--threads 2] [--seconds 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

BENCH, REPO = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
# this file is bench/engines.py: with bench/ on sys.path, `import engines` would import this script itself
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH] + [str(REPO)]
_spec = importlib.util.spec_from_file_location("_bench_common", BENCH / "_common.py")
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)
machine, table, write_result = _common.machine, _common.table, _common.write_result


# ----------------------------------------------------------------------------- frames and models
def synthetic_frames(n: int, hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    """n RGB inspection frames at hw (the demo scene renderer; random shading if it is missing)."""
    rng = np.random.default_rng(seed)
    try:
        from trainer.data.scene import render_scene
    except ImportError:
        coarse = rng.integers(40, 200, (n, hw[0] // 16 + 1, hw[1] // 16 + 1, 3)).astype(np.uint8)
        return np.ascontiguousarray(coarse.repeat(16, 1).repeat(16, 2)[:, :hw[0], :hw[1]])
    return np.stack([render_scene(rng, hw)[0] for _ in range(n)])


def activate(model, frames: np.ndarray) -> None:
    """Give random weights realistic outputs: BatchNorm stats from `frames`, a class head that fires on some."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255)
    torch.manual_seed(1)
    for cls in model.model[-1].cv3:
        torch.nn.init.normal_(cls[-1].weight, std=0.05)
        cls[-1].bias.data[:] = -3.5  # from none to hundreds of detections per frame: NMS has work to do
    model.eval()


def prepare(out: Path) -> None:
    """(subprocess) Export ours (turbo, and v1 = ultralytics' weights) and theirs to `out`."""
    import torch
    from ultralytics import YOLO as UltralyticsYOLO

    from trainer.export import export_onnx
    from trainer.nn import build_model

    calib = synthetic_frames(4, (640, 640), seed=1)
    torch.manual_seed(0)
    turbo = build_model("yolov12n.yaml", nc=80)
    activate(turbo, calib)
    export_onnx(turbo, out / "turbo.onnx", (640, 640), batch=16, dynamic=True)
    torch.manual_seed(0)
    theirs = UltralyticsYOLO("yolo12n.yaml")
    activate(theirs.model, calib)
    ours = build_model("yolov12n-v1.yaml", nc=80)
    ours.load_state_dict(theirs.model.state_dict())
    export_onnx(ours.eval(), out / "ours.onnx", (640, 640), batch=16, dynamic=True)
    cwd = os.getcwd()
    os.chdir(out)
    try:
        path = theirs.export(format="onnx", imgsz=640, dynamic=True, simplify=True, verbose=False)
    finally:
        os.chdir(cwd)
    Path(path).replace(out / "theirs.onnx")


# ----------------------------------------------------------------------------- in-process tables
def _rate(fn, seconds: float, images_per_call: int) -> float:
    fn()
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += images_per_call
    return n / (time.perf_counter() - t0)


def batch_table(onnx: Path, threads: int, seconds: float) -> str:
    import engines

    eng = engines.load(onnx, threads=threads)
    rows = []
    for size in (320, 640):
        frames = synthetic_frames(16, (size, size), seed=2)
        base = None
        for b in (1, 2, 4, 8, 16):
            r = _rate(lambda b=b, frames=frames: eng.infer(frames[:b]), seconds, b)
            base = base or r
            rows.append([size, b, f"{r:.1f}", f"{1000 / r:.1f}", f"{r / base:.2f}"])
            print("batch", rows[-1], flush=True)
    return table(["imgsz", "batch", "images/s", "ms/image", "vs batch 1"], rows)


def instances_table(onnx: Path, seconds: float) -> str:
    import engines

    rows = []
    cores = os.cpu_count() or 1
    configs = [(1, 1, None), (1, cores, None), (2, 1, None), (2, 1, False), (2, cores, None), (2, cores, False)]
    for batch in (1, 4):
        frames = synthetic_frames(batch, (320, 320), seed=3)
        for instances, threads, spinning in configs:
            eng = engines.load(onnx, instances=instances, threads=threads, spinning=spinning)
            counts = [0] * instances
            stop = time.perf_counter() + seconds + 0.5
            for _ in range(instances):
                eng.infer(frames)

            def run(k: int, stop: float = stop, eng=eng, frames=frames, counts=counts) -> None:
                while time.perf_counter() < stop:
                    eng.infer(frames)
                    counts[k] += len(frames)

            start = time.perf_counter()
            workers = [threading.Thread(target=run, args=(k,)) for k in range(instances)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            rate = sum(counts) / (time.perf_counter() - start)
            rows.append([batch, instances, threads, "off" if spinning is False else "default", f"{rate:.1f}"])
            print("instances", rows[-1], flush=True)
    return table(["batch", "instances", "threads each", "spinning", "images/s (all callers)"], rows)


# ----------------------------------------------------------------------------- side-by-side workers
def worker(side: str, onnx: Path, frames_file: Path, imgsz: int, threads: int) -> None:
    """(subprocess) Serve 'go N' requests from stdin: run N frames end to end, answer seconds and detections."""
    frames = np.load(frames_file)["frames"]
    if side == "theirs":
        import torch
        from ultralytics import YOLO as UltralyticsYOLO

        torch.set_num_threads(threads)
        model = UltralyticsYOLO(str(onnx), task="detect")
        bgr = [np.ascontiguousarray(f[..., ::-1]) for f in frames]  # ultralytics takes OpenCV's BGR

        def one(i: int) -> int:
            r = model.predict(bgr[i % len(bgr)], imgsz=imgsz, conf=0.25, iou=0.7, verbose=False)[0]
            return len(r.boxes)

        one(0)  # sets up the predictor; then give its session the same thread count as ours (it uses ORT's default)
        import onnxruntime

        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = threads
        backend = model.predictor.model.backend
        backend.session = onnxruntime.InferenceSession(str(onnx), opts, providers=["CPUExecutionProvider"])
    else:
        import cv2

        import engines

        eng = engines.load(onnx, threads=threads)
        size, stride = (imgsz, imgsz), eng.info.stride

        def one(i: int) -> int:
            frame = frames[i % len(frames)]
            hw = engines.fit_shape(frame.shape[:2], size, stride)
            lb = engines.plan_letterbox(frame.shape[:2], hw)
            resized = cv2.resize(frame, (lb.new_hw[1], lb.new_hw[0]), interpolation=cv2.INTER_LINEAR)
            dets = eng.infer(lb.place(resized)[None])[0]
            return len(lb.unscale(dets))
    for i in range(3):
        one(i)
    print("RESULT " + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        n = int(line.split()[1])
        t0 = time.perf_counter()
        dets = sum(one(i) for i in range(n))
        print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "images": n, "dets": dets / n}), flush=True)


def _reply(p: subprocess.Popen) -> dict:
    """The next RESULT line of a worker (libraries may print other lines to stdout)."""
    while True:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker exited with {p.wait()}: see its error above")
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])


def side_by_side(work: Path, thread_counts: list[int], rounds: int, n: int) -> str:
    rows = []
    cases = (((360, 640), 320), ((360, 640), 640), ((720, 1280), 640))
    for threads, (frame_hw, imgsz) in [(t, c) for t in thread_counts for c in cases]:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
        frames_file = work / f"frames_{frame_hw[1]}.npz"
        np.savez(frames_file, frames=synthetic_frames(8, frame_hw, seed=4))
        procs = {side: subprocess.Popen([sys.executable, __file__, "--worker", side, "--onnx",
                                         str(work / f"{side}.onnx"), "--frames", str(frames_file), "--imgsz",
                                         str(imgsz), "--threads", str(threads)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env, cwd=work)
                 for side in ("ours", "theirs")}
        for p in procs.values():
            _reply(p)  # loaded and warmed up
        rates: dict[str, list[float]] = {"ours": [], "theirs": []}
        dets: dict[str, float] = {}
        for _ in range(rounds):  # alternate so machine noise hits both alike
            for side, p in procs.items():
                p.stdin.write(f"go {n}\n")
                p.stdin.flush()
                r = _reply(p)
                rates[side].append(r["images"] / r["seconds"])
                dets[side] = r["dets"]
        for p in procs.values():
            p.stdin.close()
            p.wait(60)
        ours, theirs = float(np.median(rates["ours"])), float(np.median(rates["theirs"]))
        rows.append([threads, f"{frame_hw[1]}x{frame_hw[0]}", imgsz, f"{ours:.1f}", f"{theirs:.1f}",
                     f"{ours / theirs:.2f}", f"{dets['ours']:.1f} / {dets['theirs']:.1f}"])
        print("vs ultralytics", rows[-1], flush=True)
    return table(["threads", "frame", "imgsz", "ours images/s", "ultralytics images/s", "ratio ours/theirs",
                  "detections per frame (ours / theirs)"], rows)


def fixed_shape_table(onnx: Path, calls: int = 150) -> str:
    """Single frames on fixed-shape sessions (engines/ort_fixed.py) against the dynamic session, 2 callers
    busy, each alternating the two engines call by call: the median of per-pair ratios cancels the drift."""
    import engines

    rows = []
    for hw in ((192, 320), (320, 320)):
        for batch in (1, 2):
            frames = synthetic_frames(batch, hw, seed=4)
            dyn = engines.load(onnx, instances=2, threads=1, fixed_after=0)
            fixed = engines.load(onnx, instances=2, threads=1, fixed_after=1)
            for _ in range(3):
                fixed.infer(frames)
            end = time.perf_counter() + 30
            while batch == 1 and not fixed.fixed_shapes and time.perf_counter() < end:
                time.sleep(0.05)
            pairs: list[tuple[float, float]] = []

            def run(dyn=dyn, fixed=fixed, frames=frames, pairs=pairs) -> None:
                for _ in range(calls // len(frames)):
                    t0 = time.perf_counter()
                    dyn.infer(frames)
                    t1 = time.perf_counter()
                    fixed.infer(frames)
                    pairs.append((t1 - t0, time.perf_counter() - t1))

            workers = [threading.Thread(target=run) for _ in range(2)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            used_fixed = "yes" if fixed.fixed_shapes else "no (batch > 1)"
            dyn.close()
            fixed.close()
            d, f = np.array(pairs).T
            rows.append([f"{hw[0]}x{hw[1]}", batch, used_fixed,
                         f"{np.median(d) * 1e3:.1f}", f"{np.median(f) * 1e3:.1f}", f"{np.median(f / d):.3f}"])
            print("fixed shapes", rows[-1], flush=True)
    return table(["input", "batch", "fixed session", "dynamic ms", "fixed-shape engine ms",
                  "paired ratio (lower: faster)"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--frames-per-round", type=int, default=16)
    parser.add_argument("--worker", choices=["ours", "theirs"])
    parser.add_argument("--prepare", type=Path)
    parser.add_argument("--onnx", type=Path)
    parser.add_argument("--frames", type=Path)
    parser.add_argument("--imgsz", type=int, default=640)
    args = parser.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(tempfile.gettempdir()) / "yolov12-bench-ultralytics"))
    if args.worker:
        return worker(args.worker, args.onnx, args.frames, args.imgsz, args.threads)
    if args.prepare:
        return prepare(args.prepare)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, __file__, "--prepare", str(work)], check=True, env=env, cwd=work)
        load = os.getloadavg()[0]
        batches = batch_table(work / "turbo.onnx", args.threads, args.seconds)
        instances = instances_table(work / "turbo.onnx", args.seconds)
        fixed = fixed_shape_table(work / "turbo.onnx")
        versus = side_by_side(work, sorted({1, args.threads}), args.rounds, args.frames_per_round)
    import onnxruntime

    header = (f"Machine: {machine()}; onnxruntime {onnxruntime.__version__}, {args.threads} intra-op threads "
              f"unless stated; load average at start {load:.1f} (other work on the machine slows every row alike: "
              "compare within a table).")
    text = (f"# ONNX Runtime engines (bench/engines.py)\n\n{header}\n\n"
            "## Batch size (yolov12n turbo, one session, square synthetic frames, NMS in the graph)\n\n"
            f"{batches}\n\n## Threads x instances (320x320 frames; K sessions driven by K threads)\n\n{instances}\n\n"
            "## Fixed-shape sessions for single frames (2 instances x 1 thread, both busy; paired calls)\n\n"
            f"{fixed}\n\n"
            "## Ours vs ultralytics, same weights (yolo12n = our v1), end to end incl. letterbox and NMS\n\n"
            f"{versus}\n")
    print(text)
    print(f"written to {write_result('engines.md', text)}")


if __name__ == "__main__":
    main()
