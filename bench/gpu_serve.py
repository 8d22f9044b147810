"""Section 4 of bench/gpu_check.py: the real server on one GPU with N 1080p@25 H.264 cameras.

Each camera is a synthetic conveyor recording (trainer.data.synth scenes on a sliding belt, encoded once per run
by libx264 like an IP camera: High profile, no B-frames, one keyframe a second) that the server plays as a camera
(`--allow-files`: real-time pace, seamless loop). `yolov12-serve` runs as a subprocess with the PyTorch backend
on the GPU, once per decode path (`--decode cpu`, then `--decode nvdec`: PyAV's CUDA hwaccel), then the better
path again with the device in a process of its own (`--worker-processes on`); cameras are added
over gRPC in steps (N = 8, 16, 32, 48, 64) and one `Client.watch` reads every result. Per step: results/s,
p50/p99 latency (FrameDetections.latency_ms: ingest to publish), server-counted drops, frames delivered
against what the cameras sent (a decoder that cannot keep up loses frames before the server counts them),
server CPU cores busy and NVDEC / GPU utilisation (NVML). A step passes with p99 <= 45 ms and >= 99% of the
cameras' frames delivered; a path's ramp stops at a clearly saturated step or when its share of the time is
spent (the section fits in about 3 minutes).

    python bench/gpu_check.py --only serve --out $OUT    # on the GPU machine
    python bench/gpu_serve.py --smoke                    # alone, on a CPU: ONNX demo model, 2 small cameras
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.append(str(Path(__file__).resolve().parent))
from _common import table  # noqa: E402

__all__ = ["server_check", "write_clip"]

CAMERA_FPS = 25
SLO_MS = 45.0
DELIVERED_MIN = 0.99  # a step passes with at least this share of the cameras' frames published ...
SATURATED = 0.90  # ... and the ramp stops below this share, or at p99 over twice the SLO


@dataclass
class Plan:
    """What one run measures: engine, device, clip, steps and time."""

    engine: Path
    gpus: str
    size: tuple[int, int]  # camera (h, w)
    clip_s: float
    steps: tuple[int, ...]
    settle_s: float  # after adding cameras, before the window
    window_s: float
    budget_s: float  # the whole section, clip included
    server_args: list[str] = field(default_factory=list)
    path_min_s: float = 60.0  # a decode path with less time than this is not started (a server start takes that)


def gpu_plan(tmp: Path) -> Plan:
    return Plan(_checkpoint(tmp), "0", (1080, 1920), 6.0, (8, 16, 32, 48, 64), 2.0, 8.0, 240.0,
                ["--max-batch", "32", "--instances", "2"])


def smoke_plan(tmp: Path) -> Plan:
    demo = REPO / "yolov12_serve" / "assets" / "demo.onnx"
    return Plan(demo if demo.is_file() else _checkpoint(tmp), "cpu", (360, 640), 2.0, (1, 2), 0.5, 1.0, 50.0,
                ["--max-batch", "4", "--instances", "1"], path_min_s=5.0)


def _checkpoint(tmp: Path) -> Path:
    """The trained demo checkpoint (the PyTorch engine), or a random yolov12n where it is missing."""
    ckpt = REPO / "tests" / "assets" / "yolov12n-defects.pt"
    if ckpt.is_file():
        return ckpt
    from trainer.checkpoint import save_checkpoint
    from trainer.nn import build_model

    return Path(save_checkpoint(tmp / "random-yolov12n.pt", build_model("yolov12n.yaml", nc=5), imgsz=320))


# ------------------------------------------------------------------------------------------------ the cameras
def write_clip(path: Path, size: tuple[int, int] = (1080, 1920), fps: int = CAMERA_FPS, seconds: float = 6.0,
               seed: int = 1) -> Path:
    """A conveyor-belt recording like an IP camera's: synthetic parts with defects sliding past, H.264 (libx264,
    High profile, no B-frames, a keyframe every second) in an mp4."""
    import av

    from yolov12_serve.sources.synthetic import SyntheticCamera, render_strip

    h, w = size
    strip = render_strip(SyntheticCamera("clip", size=(h, w), seed=seed, strip=3))
    speed = max(2, w // 80)  # belt pixels per frame
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"preset": "veryfast", "crf": "23", "x264-params": f"keyint={fps}:min-keyint={fps}:bframes=0"}
        for i in range(round(seconds * fps)):
            x = (i * speed) % (strip.shape[1] - w)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(strip[:, x:x + w]), format="rgb24")
            for packet in s.encode(frame):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)
    return path


# ------------------------------------------------------------------------------------------------ the server
def _cpu_seconds(pid: int) -> float:
    """CPU seconds of process `pid` and of its children (device processes, --worker-processes on), from /proc."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class Server:
    """`yolov12-serve` in a subprocess on free ports (log in a file), with one watcher reading every result."""

    def __init__(self, plan: Plan, decode: str, log: Path, startup_s: float = 240.0, processes: bool = False) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
        cmd = [sys.executable, "-m", "yolov12_serve", "--engines", str(plan.engine), "--gpus", plan.gpus,
               "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--allow-files", "--decode", decode,
               "--no-state", "--slo-ms", str(SLO_MS), "--max-streams", str(max(plan.steps)), *plan.server_args,
               "--worker-processes", "on" if processes else "off"]
        self.log_path = log
        self._log = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=REPO, env=env)
        self.port = 0
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                m = re.search(r"gRPC on [\d.]+:(\d+)", line)
                if m:
                    self.port = int(m.group(1))
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(startup_s) or not self.port:
            self.stop()
            raise RuntimeError(f"the server did not start in {startup_s:.0f} s:\n{self.log()[-3000:]}")
        from yolov12_serve.client import Client

        self.client = Client(f"127.0.0.1:{self.port}", timeout=30)
        self.client.wait_ready(60)
        self.results: list[tuple[float, float]] = []  # (arrival, latency_ms)
        self._watch = self.client.watch()
        threading.Thread(target=self._read_results, daemon=True).start()

    def _read_results(self) -> None:
        try:
            for fd in self._watch:
                self.results.append((time.perf_counter(), fd.latency_ms))
        except Exception:  # cancelled at stop
            pass

    def add_cameras(self, n: int, clip: Path) -> None:
        """Bring the number of cameras up to `n` (ids cam0, cam1, ...), all playing `clip`."""
        have = len(self.client.list_streams())
        for i in range(have, n):
            self.client.add_stream(f"cam{i}", str(clip))

    def counters(self) -> dict[str, Any]:
        """Processed / dropped totals, streaming cameras, server CPU seconds, at one instant."""
        streams = self.client.list_streams()
        return {"t": time.perf_counter(), "processed": sum(s.frames_processed for s in streams),
                "dropped": sum(s.frames_dropped for s in streams), "streaming": sum(s.state == 2 for s in streams),
                "errors": sorted({s.last_error for s in streams if s.last_error}), "cpu_s": _cpu_seconds(self.proc.pid)}

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if hasattr(self, "_watch"):
            self._watch.cancel()
            self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


class Nvml:
    """NVDEC and SM utilisation of one GPU (NVML), averaged over samples; None where NVML is missing."""

    def __init__(self, gpu: str) -> None:
        self.handle = None
        if gpu == "cpu":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(gpu))
        except Exception:
            self.handle = None
        self.samples: list[tuple[float, float]] = []

    def sample(self) -> None:
        if self.handle is None:
            return
        try:
            dec = self.nvml.nvmlDeviceGetDecoderUtilization(self.handle)[0]
            self.samples.append((float(dec), float(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)))
        except Exception:  # a reading NVML refuses on this machine: the columns stay empty
            self.handle = None

    def take(self) -> tuple[float | None, float | None]:
        """(NVDEC %, GPU %) averaged since the last take."""
        if self.handle is None or not self.samples:
            return None, None
        dec, sm = np.mean(self.samples, axis=0)
        self.samples = []
        return float(dec), float(sm)


# ------------------------------------------------------------------------------------------------ measuring
def measure(server: Server, n: int, clip: Path, plan: Plan, nvml: Nvml) -> dict[str, Any]:
    """Bring the server to `n` cameras, let them settle, measure one window."""
    server.add_cameras(n, clip)
    end = time.perf_counter() + 15
    while server.counters()["streaming"] < n and time.perf_counter() < end:
        time.sleep(0.2)
    time.sleep(plan.settle_s)
    a = server.counters()
    nvml.take()
    while time.perf_counter() < a["t"] + plan.window_s:
        time.sleep(0.5)
        nvml.sample()
    b = server.counters()
    dt = b["t"] - a["t"]
    latency = np.array([lat for t, lat in list(server.results) if a["t"] <= t <= b["t"]])
    processed, dropped = b["processed"] - a["processed"], b["dropped"] - a["dropped"]
    sent = n * CAMERA_FPS * dt
    nvdec, gpu = nvml.take()
    row = {"streams": n, "results_per_s": len(latency) / dt,
           "p50_ms": float(np.percentile(latency, 50)) if len(latency) else None,
           "p99_ms": float(np.percentile(latency, 99)) if len(latency) else None,
           "drops_pct": 100 * dropped / max(processed + dropped, 1), "delivered_pct": 100 * processed / sent,
           "cpu_cores": (b["cpu_s"] - a["cpu_s"]) / dt, "nvdec_pct": nvdec, "gpu_pct": gpu,
           "streaming": b["streaming"], "errors": b["errors"][:3]}
    row["ok"] = bool(row["p99_ms"] is not None and row["p99_ms"] <= SLO_MS and processed >= DELIVERED_MIN * sent)
    row["saturated"] = bool(row["p99_ms"] is None or row["p99_ms"] > 2 * SLO_MS or processed < SATURATED * sent)
    return row


def path_name(decode: str, processes: bool) -> str:
    return f"{decode}, device process" if processes else decode


def run_path(plan: Plan, decode: str, clip: Path, tmp: Path, deadline: float,
             processes: bool = False) -> dict[str, Any]:
    """One server with `--decode decode` (and the device in a process of its own): the ramp of steps until
    saturated or out of time."""
    name = path_name(decode, processes)
    log = tmp / f"server-{name.replace(', ', '-').replace(' ', '-')}.log"
    t0 = time.perf_counter()
    server = Server(plan, decode, log, startup_s=min(240.0, max(60.0, deadline - t0)), processes=processes)
    out: dict[str, Any] = {"decode": name, "startup_s": time.perf_counter() - t0, "rows": [], "stopped": ""}
    nvml = Nvml(plan.gpus)
    try:
        for n in plan.steps:
            if time.perf_counter() + plan.settle_s + plan.window_s + 3 > deadline:
                out["stopped"] = f"time: steps from {n} cameras not run"
                break
            row = measure(server, n, clip, plan, nvml)
            out["rows"].append(row)
            if row["saturated"]:
                out["stopped"] = f"saturated at {n} cameras"
                break
    finally:
        server.stop()
    text = log.read_text()
    out["on_nvdec"] = len(set(re.findall(r"stream (\S+): decoding on NVDEC", text)))
    out["nvdec_note"] = next(iter(re.findall(r"--decode \w+: (NVDEC unavailable[^\n]*)", text)), "")
    out["hw_failures"] = len(re.findall(r"hardware decoding failed", text))
    out["tracebacks"] = text.count("Traceback")
    return out


def nvdec_probe(gpu: int = 0, timeout_s: float = 60.0) -> str | None:
    """`nvdec_problem(gpu)` in a child process: FFmpeg's NVDEC path has never run on the lent machines, and a
    crash or hang in native code must cost this probe, not the whole check."""
    code = ("from yolov12_serve.sources.hwdecode import nvdec_problem; import sys; "
            f"sys.stdout.write('PROBLEM:' + (nvdec_problem({gpu}) or ''))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s,
                             cwd=REPO)
    except subprocess.TimeoutExpired:
        return f"the NVDEC probe hung (over {timeout_s:g} s)"
    found = re.search(r"PROBLEM:(.*)\Z", out.stdout, re.S)
    if out.returncode != 0 or found is None:
        tail = (out.stderr.strip().splitlines() or [""])[-1]
        return f"the NVDEC probe crashed (exit {out.returncode}{': ' + tail if tail else ''})"
    return found.group(1).strip() or None


def _path_not_run(decode: str, why: str) -> dict[str, Any]:
    """A decode path's entry when it was not measured: no rows, and why."""
    return {"decode": decode, "startup_s": 0.0, "rows": [], "on_nvdec": 0, "nvdec_note": "", "hw_failures": 0,
            "tracebacks": 0, "stopped": why}


def server_check(device: str, tmp: Path, smoke: bool, budget_s: float | None = None) -> tuple[str, Any]:
    """gpu_check section 4: (markdown with one row per decode path and camera count, JSON-able data); `budget_s`
    caps the plan's own time budget (what the whole check has left)."""
    t_start = time.perf_counter()
    plan = smoke_plan(tmp) if smoke or not device.startswith("cuda") else gpu_plan(tmp)
    if budget_s is not None:
        plan.budget_s = min(plan.budget_s, budget_s)
    h, w = plan.size
    clip = write_clip(tmp / f"camera-{w}x{h}.mp4", plan.size, CAMERA_FPS, plan.clip_s)
    clip_s = time.perf_counter() - t_start
    problem = nvdec_probe(0)
    decodes = [("cpu", False), ("nvdec", False)]
    if problem is not None and not smoke:
        decodes = [("cpu", False)]  # nothing to compare: say why below
    decodes.append((decodes[-1][0], True))  # the same with the device in a process of its own
    paths: list[dict[str, Any]] = []
    for i, (decode, processes) in enumerate(decodes):
        name = path_name(decode, processes)
        left = plan.budget_s - (time.perf_counter() - t_start)
        share = left / (len(decodes) - i)  # each path its share of what is left
        if share < plan.path_min_s:
            paths.append(_path_not_run(name, f"not run: {share:.0f} s left for it, a server start needs "
                                             f"{plan.path_min_s:g}"))
            continue
        deadline = time.perf_counter() + share
        try:
            paths.append(run_path(plan, decode, clip, tmp, deadline, processes))
        except Exception as e:  # one path's failure (a server that did not start) keeps the other path's rows
            paths.append(_path_not_run(name, f"FAILED: {type(e).__name__}: {e} (its server log has the details)"))
    rows, best = [], {}
    for p in paths:
        ok = [r["streams"] for r in p["rows"] if r["ok"]]
        best[p["decode"]] = max(ok) if ok else 0
        for r in p["rows"]:
            rows.append([p["decode"], r["streams"], f"{r['results_per_s']:.0f}", _ms(r["p50_ms"]), _ms(r["p99_ms"]),
                         f"{r['drops_pct']:.2f}", f"{r['delivered_pct']:.1f}", f"{r['cpu_cores']:.1f}",
                         _pct(r["nvdec_pct"]), _pct(r["gpu_pct"]), "yes" if r["ok"] else "no"])
    notes = [f"Engine {plan.engine.name} via `yolov12-serve --gpus {plan.gpus} {' '.join(plan.server_args)}` "
             f"(SLO {SLO_MS:g} ms); cameras: {w}x{h}@{CAMERA_FPS} H.264 files played in real time "
             f"(clip written in {clip_s:.0f} s); {plan.settle_s:g} s settle + {plan.window_s:g} s window per step; "
             f"{os.cpu_count()} CPU cores. 'delivered' = results published / frames the cameras sent; "
             f"pass = p99 <= {SLO_MS:g} ms and delivered >= {DELIVERED_MIN:.0%}. Letterbox resize on the CPU "
             "(swscale) on both paths: NVDEC frames come back to system memory."]
    for p in paths:
        on = f"{p['on_nvdec']} cameras decoded on NVDEC" if p["decode"].startswith("nvdec") else "CPU decoding"
        extra = [p["stopped"]] if p["stopped"] else []
        extra += [p["nvdec_note"]] if p["nvdec_note"] else []
        extra += [f"{p['hw_failures']} hardware-decode fallbacks"] if p["hw_failures"] else []
        extra += [f"{p['tracebacks']} tracebacks in the server log"] if p["tracebacks"] else []
        notes.append(f"- `--decode {p['decode']}`: server up in {p['startup_s']:.0f} s; {on}; largest N passing: "
                     f"**{best[p['decode']]}**" + (f" ({'; '.join(extra)})" if extra else ""))
    if problem is not None and "nvdec" not in decodes:
        notes.append(f"- `--decode nvdec`: not measured: {problem}")
    text = (notes[0] + "\n\n" + "\n".join(notes[1:]) + "\n\n"
            + table(["decode", "cameras", "results/s", "p50 ms", "p99 ms", "drops %", "delivered %", "CPU cores",
                     "NVDEC %", "GPU %", "pass"], rows))
    return text, {"plan": {"engine": str(plan.engine), "gpus": plan.gpus, "size": plan.size,
                           "args": plan.server_args}, "largest_passing": best, "paths": paths,
                  "nvdec_problem": problem}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU: the ONNX demo model and two small cameras")
    args = parser.parse_args()
    device = "cpu"
    if not args.smoke:
        import torch

        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    text, _ = server_check(device, Path(tempfile.mkdtemp(prefix="gpu-serve-")), args.smoke or device == "cpu")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
