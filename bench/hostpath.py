"""The host path with a model that costs nothing: what one server process, and one process per device,
can carry and deliver, printed as a table (not a test).

The model is the zero-cost graph of tests/zero_model.py (`images` uint8 in, `detections` [B, 300, 6] out holding
no box, metadata as our exporter writes it), served with --max-batch 32 to synthetic cameras of 320x180 at 25 fps.
Offered loads: 3,200 frames/s (128 cameras), then 1x, 2x and 4x the ceiling measured first (the most one process
ran offered 256 or 384 cameras). Two layouts, taking turns in every round: `--gpus cpu` (one process, as today)
and `--gpus cpu:2 --worker-processes on` (an API process and two device processes, the cores split between them);
two engine instances in all either way. One subscriber,
in its own process, watches every stream with `Client.watch` (WatchDetectionBatches). Per measurement: a fresh
server, 8 s to settle, a 15 s window; processed/s from yolov12_frames_processed_total (scraped alone with
`?name[]=`: the whole exposition holds a one-process server's lock ~0.5 s at 760 cameras), delivered/s and p50/p99
(ingest to publish, as the server reports it per result) from the subscriber, CPU from every server process
(psutil: the API process and its children) per processed frame.

The interpreter lock: py-spy's `--gil` sampling (250 Hz, 10 s, each server process at 1x load) counts the samples
in which a thread of the process holds it; the busy fraction over the processed rate is the lock time per frame,
and its inverse the frames/s one process could carry however many cores it has.

    pip install -e '.[bench]'                  # py-spy and psutil
    python bench/hostpath.py                   # 3 rounds (about 20 minutes on 2 cores)
    python bench/hostpath.py --rounds 1 --seconds 8 --warm 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == _BENCH:
    sys.path[0] = str(_BENCH.parent)  # the repo root: bench/engines.py must not shadow the engines package
ROOT = _BENCH.parent
sys.path.insert(1, str(ROOT / "tests"))

from bench._common import machine, table, write_result  # noqa: E402

PY = sys.executable
WORK = Path(tempfile.gettempdir()) / "yolov12-serve-bench"
FPS = 25
LAYOUTS = {  # two engine instances in all either way: one process's two, or one per device process
    "one process": ["--gpus", "cpu", "--worker-processes", "off", "--instances", "2"],
    "cpu:2": ["--gpus", "cpu:2", "--worker-processes", "on", "--instances", "1"],
}
SERVE = "import sys; sys.modules['torch'] = None; from yolov12_serve.cli import main; sys.exit(main(sys.argv[1:]))"


def zero_model() -> Path:
    from zero_model import write_zero_model

    path = WORK / "zero-cost-320.onnx"
    if not path.is_file():
        write_zero_model(path)
    return path


# ----------------------------------------------------------------------------------------------- the server
class Server:
    """yolov12-serve with `cameras` synthetic cameras (from a streams file), on free ports."""

    def __init__(self, layout: list[str], cameras: int, model: Path) -> None:
        WORK.mkdir(parents=True, exist_ok=True)
        self.streams = WORK / f"cams-{cameras}.yaml"
        # a few seeds only: cameras of one seed share their rendered strip (0.2 s of CPU each to render)
        self.streams.write_text("streams:\n" + "".join(
            f"  - {{id: cam{i}, url: 'synthetic://cam{i}?fps={FPS}&size=320x180&seed={i % 4}'}}\n"
            for i in range(cameras)))
        cmd = [PY, "-c", SERVE, "--engines", str(model), *layout, "--host", "127.0.0.1", "--port", "0",
               "--metrics-port", "0", "--max-batch", "32", "--max-streams", str(max(64, cameras)), "--no-state",
               "--allow-synthetic", "--streams", str(self.streams), "--log-level", "WARNING"]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="hostpath-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.port = self.metrics_port = 0
        end = time.monotonic() + 300
        for line in self.proc.stdout:
            m = re.search(r"gRPC on [\d.]+:(\d+), metrics on [\d.]+:(\d+)", line)
            if m:
                self.port, self.metrics_port = int(m.group(1)), int(m.group(2))
                break
            if time.monotonic() > end:
                break
        if not self.port:
            self.stop()
            raise RuntimeError(f"server did not start:\n{Path(self.log.name).read_text()[-3000:]}")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def processed(self) -> tuple[float, float, float]:
        """(frames processed so far, frames the cameras handed over so far, when: the middle of the scrape, which
        takes a while on a busy machine). Handed over is what was really offered: a camera thread that falls
        behind skips the ticks it missed."""
        t0 = time.monotonic()
        # only the two families read here: the whole exposition is ~2 MB at 760 cameras and rendering it holds
        # the server's interpreter lock for a while at both ends of the window it measures
        only = "name[]=yolov12_frames_processed_total&name[]=yolov12_frames_total"
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics?{only}", timeout=30) as r:
            text = r.read().decode()
        n = sum(float(v) for v in re.findall(r"^yolov12_frames_processed_total\{[^}]*\} (\S+)$", text, re.M))
        ingested = sum(float(v) for v in re.findall(r"^yolov12_frames_total\{[^}]*\} (\S+)$", text, re.M))
        return n, ingested, (t0 + time.monotonic()) / 2

    def processes(self) -> list:
        """The server's processes: the API process and its children (device processes, multiprocessing's
        resource tracker)."""
        import psutil

        me = psutil.Process(self.proc.pid)
        return [me, *me.children(recursive=True)]

    def device_processes(self) -> list:
        return [p for p in self.processes()[1:] if "resource_tracker" not in " ".join(p.cmdline())]

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.processes():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except Exception:  # a process that just ended
                pass
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        os.unlink(self.log.name)


# ----------------------------------------------------------------------------------------------- the subscriber
def subscribe(address: str) -> None:
    """The subscriber process: watch everything; 'start' / 'stop' on stdin open and close a window, whose count,
    latency percentiles and this process's CPU go to stdout as one JSON line."""
    import numpy as np

    from yolov12_serve.client import Client

    window: dict | None = None
    lock = threading.Lock()

    def read() -> None:
        client = Client(address)
        for fd in client.watch():
            with lock:
                if window is not None:
                    window["n"] += 1
                    window["lat"].append(fd.latency_ms)

    threading.Thread(target=read, daemon=True).start()
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "start":
            with lock:
                window = {"n": 0, "lat": [], "cpu": time.process_time(), "t": time.monotonic()}
        elif cmd == "stop":
            with lock:
                w, window = window, None
            lat = np.array(w["lat"] or [0.0])
            print(json.dumps({"n": w["n"], "seconds": time.monotonic() - w["t"], "cpu": time.process_time() - w["cpu"],
                              "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}),
                  flush=True)
        elif cmd == "quit":
            return


class Subscriber:
    def __init__(self, address: str) -> None:
        self.proc = subprocess.Popen([PY, str(Path(__file__).resolve()), "--subscribe", address], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})

    def send(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def stop_window(self) -> dict:
        self.send("stop")
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        try:
            self.send("quit")
            self.proc.wait(10)
        except Exception:
            self.proc.kill()


# ----------------------------------------------------------------------------------------------- measuring
def measure(layout: str, cameras: int, model: Path, warm: float, seconds: float, gil_s: float = 0.0) -> dict:
    srv = Server(LAYOUTS[layout], cameras, model)
    sub = Subscriber(srv.address)
    try:
        time.sleep(warm)
        c0 = srv.cpu_seconds()
        sub.send("start")
        p0, i0, t0 = srv.processed()
        time.sleep(seconds)
        c1 = srv.cpu_seconds()
        got = sub.stop_window()
        p1, i1, t1 = srv.processed()
        dt = t1 - t0
        row = {"layout": layout, "cameras": cameras, "offered": cameras * FPS, "processed": (p1 - p0) / dt,
               "ingested": (i1 - i0) / dt,
               "delivered": got["n"] / got["seconds"], "cpu_ms": 1000 * (c1 - c0) / max(p1 - p0, 1),
               "cores": (c1 - c0) / dt, "p50": got["p50"], "p99": got["p99"], "sub_cpu_ms": 1000 * got["cpu"] /
               max(got["n"], 1)}
        if gil_s:
            row["gil"] = gil_per_process(srv, gil_s)
            row["gil_processed"] = row["processed"]
        return row
    finally:
        sub.close()
        srv.stop()


def py_spy() -> str | None:
    """py-spy's path (on PATH or beside this Python: the `bench` extra), or None."""
    beside = Path(PY).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.is_file() else None)


def gil_per_process(srv: Server, seconds: float, rate: int = 250) -> list[dict]:
    """Per server process: the fraction of py-spy's samples in which one of its threads held the interpreter lock."""
    spy = py_spy()
    procs = [srv.processes()[0], *srv.device_processes()]
    out = []
    runs = []
    for p in procs:
        raw = WORK / f"gil-{p.pid}.txt"
        runs.append((p, raw, subprocess.Popen([spy, "record", "--gil", "--nonblocking", "--rate", str(rate),
                                                "--duration", str(int(seconds)), "--format", "raw", "--output",
                                                str(raw), "--pid", str(p.pid)],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    for p, raw, run in runs:
        run.wait(seconds + 60)
        samples = 0
        if raw.is_file():
            for line in raw.read_text().splitlines():
                samples += int(line.rsplit(" ", 1)[1]) if " " in line else 0
            raw.unlink()
        name = "API" if p.pid == srv.proc.pid else "device"
        out.append({"process": name, "pid": p.pid, "busy": samples / (rate * int(seconds))})
    return out


def mean_se(values: list[float]) -> str:
    if not values:
        return "-"
    m = statistics.fmean(values)
    if len(values) < 2:
        return f"{m:,.0f}" if m >= 100 else f"{m:.2f}"
    se = statistics.stdev(values) / math.sqrt(len(values))
    return f"{m:,.0f} ± {se:,.0f}" if m >= 100 else f"{m:.2f} ± {se:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribe", metavar="ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warm", type=float, default=8.0)
    parser.add_argument("--ceiling", type=float, help="skip measuring it: frames/s one process carries")
    parser.add_argument("--gil-seconds", type=float, default=10.0, help="0: no interpreter-lock measurement")
    parser.add_argument("--levels", help="only these offered loads, e.g. 3,200/s;1x (quick looks)")
    args = parser.parse_args()
    if args.subscribe:
        subscribe(args.subscribe)
        return 0
    if args.gil_seconds > 0 and py_spy() is None:  # found out at the end, the whole run was lost
        print("hostpath: py-spy not found: pip install -e '.[bench]' (or --gil-seconds 0 to skip the lock "
              "measurement)", file=sys.stderr)
        return 2
    try:
        import psutil  # noqa: F401 - the CPU of every server process
    except ImportError:
        print("hostpath: psutil not found: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    model = zero_model()
    print(f"machine: {machine()}", flush=True)
    ceiling = args.ceiling
    if ceiling is None:  # the most one process ran, offered 6,400 and 9,600 frames/s
        ceiling = 0.0
        for cameras in (256, 384):
            row = measure("one process", cameras, model, args.warm, args.seconds)
            print(f"ceiling: one process, {cameras} cameras ({cameras * FPS:,} offered): {row['processed']:,.0f} "
                  "frames/s", flush=True)
            ceiling = max(ceiling, row["processed"])
    levels = {"3,200/s": 128, **{f"{k}x": max(1, round(k * ceiling / FPS)) for k in (1, 2, 4)}}
    if args.levels:
        levels = {k: v for k, v in levels.items() if k in args.levels.split(";")}
    rows: list[dict] = []
    for r in range(args.rounds):
        names = list(LAYOUTS)
        for i, (level, cameras) in enumerate(levels.items()):
            order = names if (r + i) % 2 == 0 else names[::-1]  # who goes first alternates
            for layout in order:
                row = measure(layout, cameras, model, args.warm, args.seconds)
                row.update(round=r, level=level)
                rows.append(row)
                print(f"round {r} {level:>8} {layout:>12}: handed over {row['ingested']:7,.0f}/s processed "
                      f"{row['processed']:7,.0f}/s delivered "
                      f"{row['delivered']:7,.0f}/s cpu {row['cpu_ms']:.3f} ms/frame ({row['cores']:.2f} cores) "
                      f"p50 {row['p50']:.1f} p99 {row['p99']:.1f} ms", flush=True)
    gil = []
    if args.gil_seconds > 0:
        for layout in LAYOUTS:
            cameras = levels.get("1x", next(iter(levels.values())))
            row = measure(layout, cameras, model, args.warm, args.seconds, gil_s=args.gil_seconds)
            gil.append(row)
            print(f"GIL {layout}: {row['gil']} at {row['gil_processed']:,.0f} frames/s", flush=True)
    report = render(rows, gil, ceiling, levels, args)
    print(report)
    path = write_result("hostpath.md", report)
    print(f"written to {path}")
    return 0


def render(rows: list[dict], gil: list[dict], ceiling: float, levels: dict[str, int], args) -> str:
    head = ["layout", "offered/s (cameras)", "handed over/s", "processed/s", "delivered/s", "delivered / processed",
            "server CPU ms / frame", "server cores", "p50 ms", "p99 ms"]
    body = []
    for level, cameras in levels.items():
        for layout in LAYOUTS:
            got = [r for r in rows if r["level"] == level and r["layout"] == layout]
            body.append([layout, f"{level}: {cameras * FPS:,} ({cameras})", mean_se([r["ingested"] for r in got]),
                         mean_se([r["processed"] for r in got]), mean_se([r["delivered"] for r in got]),
                         mean_se([r["delivered"] / r["processed"] for r in got]),
                         mean_se([r["cpu_ms"] for r in got]), mean_se([r["cores"] for r in got]),
                         mean_se([r["p50"] for r in got]), mean_se([r["p99"] for r in got])])
    lines = [f"# Host path, zero-cost model ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {machine()}. {args.rounds} rounds of {args.seconds:g} s windows after {args.warm:g} s, "
             f"layouts alternating; mean ± standard error over rounds. Ceiling measured first: {ceiling:,.0f} "
             "frames/s (the most one process ran, offered 256 or 384 cameras).", "", table(head, body), ""]
    goals = []
    for layout in LAYOUTS:
        at3200 = [r["delivered"] / r["processed"] for r in rows if r["level"] == "3,200/s" and r["layout"] == layout]
        ratios = []
        for r in range(args.rounds):
            mine = [x for x in rows if x["round"] == r and x["layout"] == layout]
            peak = max(x["processed"] for x in mine)
            ratios += [x["processed"] / peak for x in mine if x["level"] == "4x"]
        delivery = f"min {min(at3200):.3f}" if at3200 else "not run"
        overload = f"{', '.join(f'{x:.2f}' for x in ratios)} (mean {mean_se(ratios)})" if ratios else "not run"
        goals.append(f"- {layout}: delivered / processed at 3,200/s offered: {delivery} (goal >= 0.99); "
                     f"4x overload / peak processed per round: {overload} (goal >= 0.95 every round)")
    one = [r["cpu_ms"] for r in rows if r["layout"] == "one process"]
    two = [r["cpu_ms"] for r in rows if r["layout"] == "cpu:2"]
    if one and two:
        per_level = []
        for level in levels:
            a = statistics.fmean(r["cpu_ms"] for r in rows if r["level"] == level and r["layout"] == "one process")
            b = statistics.fmean(r["cpu_ms"] for r in rows if r["level"] == level and r["layout"] == "cpu:2")
            per_level.append(f"{level} {b / a:.2f}")
        goals.append(f"- cpu:2 CPU per frame over one process's: {', '.join(per_level)} (goal <= 1.15)")
    lines += ["Goals:", *goals, ""]
    if gil:
        lines += ["Interpreter lock (py-spy --gil, 1x load):", ""]
        for row in gil:
            for p in row["gil"]:
                share = row["gil_processed"] / (len(row["gil"]) - 1) if p["process"] == "device" else \
                    row["gil_processed"]
                per_frame = p["busy"] / max(share, 1)
                lines.append(f"- {row['layout']}, {p['process']} process {p['pid']}: lock held {p['busy']:.0%} of the "
                             f"time at {share:,.0f} frames/s: {per_frame * 1e6:.0f} us per frame, so at most "
                             f"{1 / per_frame if per_frame else float('inf'):,.0f} frames/s for that process")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
