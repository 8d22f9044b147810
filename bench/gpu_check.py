"""Everything GPU-related, checked and timed in one call: run it whenever a GPU is lent.

    python bench/gpu_check.py --out $OUT          # on a CUDA machine: about 7 minutes (--budget 400)
    python bench/gpu_check.py --smoke --out DIR   # CPU, seconds: keeps the script from rotting (CI runs it)

Sections, each written to OUT/gpu_check.md (tables) and OUT/gpu_check.json as it finishes, so a
run cut short still leaves what it measured; each gets a share of --budget and a section that no
longer fits is reported as skipped (one device session is about 15 minutes, start-up included).
Section 4 runs before 3, so the server keeps its time when the earlier sections are slow:
  0. environment: GPU, torch, attention backend, TensorRT / flash-attn / PyAV NVDEC availability
  1. correctness: the PyTorch backend on CUDA fp16 against the CPU fp32 reference on the same frames
     (detections matched by IoU; box and score errors), and TensorRT where it is importable
  2. model speed: yolov12n/s at 640, batch 1..64, eager vs CUDA graphs (vs torch.compile with --compile)
  3a. the trainer's promise: yolov12s at 640, global batch 256, one whole epoch with the automatic memory
     plan (the micro-batch the planner chose, the peak memory, no out-of-memory error)
  3. training memory: one training step of yolov12s at 640 at growing global batch, for memory
     features off / bf16 / bf16 + checkpointing / bf16 + automatic micro-batching: the largest batch
     that fits and images/s
  4. the server on one GPU: N synthetic 1080p@25 H.264 cameras through the real server (PyTorch
     backend), decoded on the CPU and, where available, on NVDEC; p50/p99 latency and drops per N
Whatever the machine lacks (TensorRT, flash-attn, NVDEC) is reported as missing, not failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.append(str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
from _common import table  # noqa: E402


class Report:
    """Sections of tables, flushed to OUT after each one (a time-out keeps what was done)."""

    def __init__(self, out: Path) -> None:
        self.out, self.sections, self.data = out, [], {}
        self.failed: list[str] = []
        out.mkdir(parents=True, exist_ok=True)

    def add(self, title: str, text: str, data: Any) -> None:
        self.sections.append(f"## {title}\n\n{text}\n")
        self.data[title] = data
        (self.out / "gpu_check.md").write_text("# GPU check\n\n" + "\n".join(self.sections))
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=1, default=str))
        print(f"\n## {title}\n\n{text}\n", flush=True)


class PartialSectionError(Exception):
    """A section that failed in part: its table (with the failed rows) is still reported."""

    def __init__(self, text: str, data: Any) -> None:
        super().__init__("some rows failed")
        self.text, self.data = text, data


def section(report: Report, title: str, fn: Callable[[], tuple[str, Any]]) -> None:
    """Run one section; an exception is reported in its place and the next section still runs."""
    t0 = time.perf_counter()
    failed = True
    try:
        text, data = fn()
        failed = False
    except PartialSectionError as e:
        text, data = f"FAILED in part:\n\n{e.text}", e.data
    except Exception as e:
        text, data = f"FAILED: {e.__class__.__name__}: {e}\n\n```\n{traceback.format_exc()[-3000:]}\n```", None
    title = f"{title} ({time.perf_counter() - t0:.0f} s)"
    if failed:
        report.failed.append(title)
    report.add(title, text, data)


# ---------------------------------------------------------------------------------------------- 0
def environment(device: str) -> tuple[str, Any]:
    import torch

    from trainer.nn import attention_backend

    info: dict[str, Any] = {"torch": torch.__version__, "device": device, "cuda": torch.version.cuda}
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, memory_gb=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                    bf16=torch.cuda.is_bf16_supported())
        q = torch.randn(8, 4, 400, 32, device=device, dtype=torch.float16)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernels = []
        for name, kind in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            try:
                with sdpa_kernel(kind):
                    torch.nn.functional.scaled_dot_product_attention(q, q, q)
                kernels.append(name)
            except RuntimeError:
                pass
        info["sdpa_kernels_for_our_shapes"] = kernels or ["math"]
    info["attention_backend"] = attention_backend(device)
    for mod in ("tensorrt", "flash_attn", "av", "pynvml"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "present")
        except Exception as e:
            info[mod] = f"missing ({e.__class__.__name__})"
    try:
        import av
        from gpu_serve import nvdec_probe

        info["av_hwdevices"] = list(av.codec.hwaccel.hwdevices_available())
        problem = nvdec_probe(0)  # decodes a tiny clip through the hardware path, in a child process
        info["nvdec"] = "works" if problem is None else f"unavailable: {problem}"
    except Exception as e:
        info["nvdec"] = f"unknown ({e})"
    return table(["key", "value"], [[k, v] for k, v in info.items()]), info


# ---------------------------------------------------------------------------------------------- 1
def frames(n: int, hw: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """Synthetic factory frames with defects (the demo cameras' renderer)."""
    from trainer.data.synth import render_scene

    rng = np.random.default_rng(seed)
    return [render_scene(rng, hw)[0] for _ in range(n)]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:4] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter + 1e-9)


def match(ref: list[np.ndarray], got: list[np.ndarray], min_score: float = 0.3) -> dict[str, float]:
    """Greedy matching of confident reference detections (same class, best IoU): recall and errors."""
    matched, total, ious, dscore = 0, 0, [], []
    for r, g in zip(ref, got):
        r = r[r[:, 4] >= min_score]
        total += len(r)
        if not len(r) or not len(g):
            continue
        iou = _iou(r, g) * (r[:, None, 5] == g[None, :, 5])
        for i in range(len(r)):
            j = int(iou[i].argmax())
            if iou[i, j] > 0.5:
                matched += 1
                ious.append(iou[i, j])
                dscore.append(abs(r[i, 4] - g[j, 4]))
    return {"reference_dets": total, "matched": matched, "recall": matched / max(total, 1),
            "min_iou": float(min(ious)) if ious else None, "max_score_err": float(max(dscore)) if dscore else None}


def checkpoint_path(tmp: Path) -> Path:
    """The bundled trained checkpoint (real detections), or a random yolov12n when it is missing."""
    ckpt = REPO / "tests" / "assets" / "yolov12n-defects.pt"
    if ckpt.exists():
        return ckpt
    from trainer.checkpoint import save_checkpoint
    from trainer.nn import build_model

    return save_checkpoint(tmp / "random.pt", build_model("yolov12n.yaml", nc=5), imgsz=640)


def correctness(device: str, tmp: Path, smoke: bool) -> tuple[str, Any]:
    import engines

    ckpt = checkpoint_path(tmp)
    size = (320, 320) if smoke else (384, 640)
    batch = np.stack(frames(2 if smoke else 16, size))
    cpu = engines.load(ckpt, device="cpu")
    ref = cpu.infer(batch)
    rows, data = [], {}
    precision = "fp16" if device.startswith("cuda") else "fp32"
    candidates = [(f"pytorch {precision} {device}", lambda: engines.load(ckpt, device=device))]
    if device.startswith("cuda"):
        candidates.append(("pytorch fp16 eager", lambda: engines.load(ckpt, device=device, cuda_graphs=False)))
        try:
            import tensorrt  # noqa: F401

            from trainer import YOLO

            def trt():
                path = YOLO(str(ckpt)).export(format="engine", half=True, imgsz=640, dynamic=True, batch=32,
                                              output=tmp / "check.engine")
                return engines.load(path, device=device)

            candidates.append(("tensorrt fp16", trt))
        except ImportError:
            rows.append(["tensorrt", "not installed here", "", "", ""])
    for name, make in candidates:
        try:  # one candidate's failure (a TensorRT build, a CUDA graph capture) keeps the others' rows
            eng = make()
            got = [eng.infer(batch), eng.infer(batch)]  # first call: warm-up (and capture), second: replay
            eng.close()
        except Exception as e:
            data[name] = {"error": f"{type(e).__name__}: {e}"}
            rows.append([name, "FAILED", f"{type(e).__name__}: {str(e)[:200]}", "", ""])
            continue
        for call, dets in zip(("first call", "second call"), got):
            m = match(ref, dets)
            data[f"{name}, {call}"] = m
            rows.append([f"{name}, {call}", m["reference_dets"], f"{m['recall']:.3f}", m["min_iou"],
                         m["max_score_err"]])
    if any("error" in v for v in data.values()):
        raise PartialSectionError(table(["engine", "ref dets", "matched", "min IoU", "max |score err|"], rows), data)
    text = (f"Reference: CPU fp32, {len(batch)} frames {size[0]}x{size[1]}, detections with score >= 0.3.\n\n"
            + table(["engine", "ref dets", "matched", "min IoU", "max |score err|"], rows))
    return text, data


# ---------------------------------------------------------------------------------------------- 2
def _cuda_time(fn: Callable[[], Any], iters: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def model_speed(device: str, smoke: bool, compile_too: bool) -> tuple[str, Any]:
    import torch

    from trainer.nn import build_model

    scales = ["n"] if smoke else ["n", "s"]
    batches = [1, 2] if smoke else [1, 8, 16, 32, 64]
    size = 64 if smoke else 640
    cuda = device.startswith("cuda")
    rows, data = [], []
    for scale in scales:
        model = build_model(f"yolov12{scale}.yaml").eval().fuse()
        if cuda:
            model = model.half().to(device, memory_format=torch.channels_last)
        dtype = torch.float16 if cuda else torch.float32
        compiled = torch.compile(model, mode="max-autotune-no-cudagraphs") if compile_too and cuda else None
        for b in batches:
            x = torch.rand(b, 3, size, size, device=device, dtype=dtype)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                if not cuda:
                    t0 = time.perf_counter()
                    model(x)
                    eager, graph, comp = time.perf_counter() - t0, None, None
                else:
                    iters = max(5, 200 // b)
                    eager = _cuda_time(lambda m=model, x=x: m(x), iters)
                    static = x.clone()
                    g = torch.cuda.CUDAGraph()
                    for _ in range(2):
                        model(static)
                    torch.cuda.synchronize()
                    with torch.cuda.graph(g):
                        model(static)
                    graph = _cuda_time(g.replay, iters)
                    comp = _cuda_time(lambda c=compiled, x=x: c(x), iters) if compiled is not None else None
            best = min(t for t in (eager, graph, comp) if t)
            row = {"model": f"yolov12{scale}", "imgsz": size, "batch": b, "eager_ms": eager * 1e3,
                   "graph_ms": graph * 1e3 if graph else None, "compile_ms": comp * 1e3 if comp else None,
                   "images_per_s": b / best}
            data.append(row)
            rows.append([row["model"], size, b, f"{eager * 1e3:.2f}", f"{graph * 1e3:.2f}" if graph else "-",
                         f"{comp * 1e3:.2f}" if comp else "-", f"{b / best:,.0f}"])
    text = (f"fp16, channels_last, fused BN on {device}; ms per batch; images/s from the fastest column.\n\n"
            + table(["model", "imgsz", "batch", "eager ms", "CUDA graph ms", "compile ms", "images/s"], rows))
    return text, data


# ---------------------------------------------------------------------------------------------- 3
def _synthetic_batch(n: int, size: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(n)
    per = 6
    return {"img": torch.randint(0, 255, (n, 3, size, size), dtype=torch.uint8, generator=g),
            "batch_idx": torch.arange(n, dtype=torch.float32).repeat_interleave(per),
            "cls": torch.randint(0, 5, (n * per, 1), generator=g).float(),
            "bboxes": torch.rand(n * per, 4, generator=g) * torch.tensor([0.6, 0.6, 0.2, 0.2]) + 0.2,
            "im_file": [""] * n, "ori_shape": [(size, size)] * n, "ratio_pad": [((1.0, 1.0), (0.0, 0.0))] * n}


def training_epoch(device: str, tmp: Path, smoke: bool) -> tuple[str, dict[str, Any]]:
    """The trainer's promise on one GPU: yolov12s at 640, global batch 256, whole epochs with nothing set by hand
    (the planner probes the micro-batch, checkpointing and precision are automatic), through `Trainer.train`."""
    import torch

    from trainer.config import TrainConfig
    from trainer.data import synthesize
    from trainer.distributed import DistContext
    from trainer.engine import Trainer
    from trainer.nn import build_model

    size, scale, batch, images = (64, "n", 8, 16) if smoke else (640, "s", 256, 512)
    data = synthesize(tmp / "epoch-data", images=images + images // 8, imgsz=size, val_fraction=1 / 9, seed=1)
    cuda = device.startswith("cuda")
    cfg = TrainConfig.from_kwargs(data=str(data), imgsz=size, batch=batch, epochs=1, workers=0 if smoke else 8,
                                  cache="ram", plots=False, verbose=False, device=device.split(":")[-1] if cuda
                                  else "cpu", memory_budget="" if cuda else "64GB")  # a CPU probes only when asked
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    (tmp / "epoch-run" / "weights").mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, build_model(f"yolov12{scale}.yaml", nc=5), DistContext(device=torch.device(device)),
                      tmp / "epoch-run")
    planned = trainer.micro_batch
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_reserved() / 2**30 if cuda else None
    card = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None
    out = {"model": f"yolov12{scale}", "imgsz": size, "global_batch": batch, "images": len(trainer.train_set),
           "micro_batch_planned": planned, "micro_batch_final": trainer.micro_batch,
           "accumulation_steps": -(-batch // trainer.micro_batch), "plan": trainer.plan.describe(batch),
           "peak_reserved_gb": peak, "card_gb": card, "seconds": seconds,
           "images_per_s": len(trainer.train_set) / seconds, "mAP50": trainer.metrics.get("mAP50")}
    text = (f"yolov12{scale} at {size}, global batch {batch}, one epoch of {out['images']} images through "
            f"`Trainer.train` (validation included), nothing set by hand: no out-of-memory error ends it.\n\n"
            + table(["memory plan (chosen by the planner)", "micro-batch after the epoch", "peak reserved GB",
                     "card GB", "epoch s (incl. probe and val)"],
                    [[out["plan"], out["micro_batch_final"], f"{peak:.1f}" if peak else "-",
                      f"{card:.0f}" if card else "-", f"{seconds:.1f}"]]))
    return text, out


def training_memory(device: str, tmp: Path, smoke: bool, budget_s: float = 1e9) -> tuple[str, Any]:
    import torch

    from trainer.config import TrainConfig
    from trainer.data import synthesize
    from trainer.distributed import DistContext
    from trainer.engine import Trainer
    from trainer.memory import is_oom
    from trainer.nn import build_model

    size = 64 if smoke else 640
    scale = "n" if smoke else "s"
    batches = [2, 4] if smoke else [16, 32, 64, 128, 256]
    data = synthesize(tmp / "train-data", images=8, imgsz=min(size, 320), seed=0)
    configs = {"fp32, no checkpointing": ("off", "off", False), "bf16": ("bf16", "off", False),
               "bf16 + checkpointing": ("bf16", "on", False), "bf16 + auto micro-batch": ("bf16", "auto", True)}
    if not device.startswith("cuda"):
        configs = {"fp32, no checkpointing": ("off", "off", False), "fp32 + checkpointing": ("off", "on", False)}
    rows, out = [], []
    dev_index = device.split(":")[1] if ":" in device else "0"
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()  # the first row's peak must not include the earlier sections
    t_start = time.perf_counter()
    for i, (name, (amp, ckpt, micro_auto)) in enumerate(configs.items()):
        largest, ips, verdict = 0, None, ""
        share_end = t_start + budget_s * (i + 1) / len(configs)  # each configuration its share of the budget
        for b in batches:
            if largest and time.perf_counter() > share_end:
                out.append({"config": name, "batch": b, "skipped": "time"})
                verdict = f">= {largest} (larger not tried: time)"
                break
            cfg = TrainConfig.from_kwargs(data=str(data), imgsz=size, batch=b, workers=0, amp=amp,
                                          grad_checkpointing=ckpt, micro_batch=0 if micro_auto else b, verbose=False,
                                          device=dev_index if device.startswith("cuda") else "cpu", ema=False,
                                          nbs=b)  # one optimizer step per batch, whatever its size
            ctx = DistContext(device=torch.device(device))
            trainer = None
            try:
                trainer = Trainer(cfg, build_model(f"yolov12{scale}.yaml", nc=5), ctx, tmp / "run")
                batch = _synthetic_batch(b, size)
                if not micro_auto:  # the whole batch in one pass, or out of memory: no halving
                    trainer.begin_step(batch)
                step = trainer.run_step if micro_auto else trainer.accumulate_gradients
                if step(batch) is None:  # out of memory at this micro-batch size
                    raise torch.cuda.OutOfMemoryError("accumulate_gradients returned None")
                trainer.optimizer.zero_grad(set_to_none=True)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                steps = 1 if smoke else 2
                for _ in range(steps):
                    trainer.run_step(batch)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                largest, ips = b, b * steps / (time.perf_counter() - t0)
                peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
                out.append({"config": name, "batch": b, "images_per_s": ips, "peak_gb": peak,
                            "micro_batch": trainer.micro_batch})
            except Exception as e:
                if not is_oom(e) and not isinstance(e, torch.cuda.OutOfMemoryError):
                    raise
                out.append({"config": name, "batch": b, "oom": True})
                break
            finally:
                del trainer
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
        rows.append([name, verdict or largest or "none", f"{ips:,.1f}" if ips else "-"])
    text = (f"yolov12{scale} at {size}, one training step (forward, loss, backward, optimizer) per global batch "
            f"{batches}; 'auto micro-batch' probes memory and accumulates.\n\n"
            + table(["memory features", "largest batch that fits", "images/s at it"], rows))
    return text, out


# ---------------------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (what CI runs)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile (slow: max-autotune compiles every batch size; not for a "
                             "one-session run)")
    parser.add_argument("--only", default="",
                        help="comma-separated sections to run: env,correct,speed,serve,epoch,train")
    parser.add_argument("--budget", type=float, default=400.0,
                        help="seconds for the whole check (default 400): the server gets up to its own 175 s, then "
                             "training memory at most 90 s of what is left; a section that no longer fits is skipped")
    args = parser.parse_args()
    import torch

    device = "cuda:0" if torch.cuda.is_available() and not args.smoke else "cpu"
    if not args.smoke and device == "cpu":
        print("gpu_check: no CUDA GPU visible; run with --smoke on a CPU machine", file=sys.stderr)
        return 2
    report = Report(Path(args.out))
    only = set(filter(None, args.only.split(",")))
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    t0 = time.perf_counter()

    def left() -> float:
        return args.budget - (time.perf_counter() - t0)

    # (key, title, run, the least time it needs to be worth starting). The server (the product) runs before
    # training memory, so that a slow start of the session takes time from the latter, not from it.
    steps = [("env", "0. environment", lambda: environment(device), 0.0),
             ("correct", "1. correctness", lambda: correctness(device, tmp, args.smoke), 30.0),
             ("speed", "2. model speed", lambda: model_speed(device, args.smoke, args.compile), 30.0)]
    try:
        from gpu_serve import server_check  # section 4 lives beside this file

        steps.append(("serve", "4. server on one GPU",
                      lambda: server_check(device, tmp, args.smoke, None if args.smoke else left() - 30.0), 90.0))
    except ImportError as e:
        print(f"gpu_check: section 4 unavailable ({e})", file=sys.stderr)
    steps.append(("epoch", "3a. a global batch of 256 for a whole epoch",
                  lambda: training_epoch(device, tmp, args.smoke), 60.0))
    steps.append(("train", "3. training memory",
                  lambda: training_memory(device, tmp, args.smoke, min(90.0, left() - 10.0)), 40.0))
    for key, title, fn, least in steps:
        if only and key not in only:
            continue
        if not args.smoke and left() < least:
            report.add(f"{title} (skipped)", f"Skipped: {left():.0f} s of the {args.budget:g} s budget left, it needs "
                       f"{least:g} s; run it alone with `--only {key}`.", None)
            continue
        section(report, title, fn)
    print(f"gpu_check: done in {time.perf_counter() - t0:.0f} s; tables in {report.out / 'gpu_check.md'}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
