"""Soak: the real server for a long run with churn, sampling its memory, threads and file descriptors.

N synthetic cameras stream into one server (subprocess, torch blocked, the bundled model unless --model) with one
gRPC watcher on all of them; every --readd-s one camera is removed and added again under the same id (a URL
change), every --swap-s the engines are swapped (ReloadEngines: the same files loaded again beside the running
ones). Every --sample-s the server's RSS, threads and open file descriptors are read from /proc, with the results
per second the watcher got; at the end a table, and the growth from the first sample after warm-up (the second)
to the last. Not a test: a run of 30 minutes shows what CI cannot.

    python bench/soak.py                                  # 8 cameras, 30 minutes, re-add every 60 s, swap every 300 s
    python bench/soak.py --minutes 3 --readd-s 20 --swap-s 60 --sample-s 15
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
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == _BENCH:
    sys.path[0] = str(_BENCH.parent)  # the repo root: bench/engines.py must not shadow the engines package
from bench._common import machine, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SERVE = "import sys; sys.modules['torch'] = None; from yolov12_serve.cli import main; sys.exit(main(sys.argv[1:]))"


def process_figures(pid: int) -> tuple[float, int, int]:
    """(RSS MB, threads, open file descriptors) of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"^VmRSS:\s+(\d+)", status, flags=re.M).group(1)) / 1024
    threads = int(re.search(r"^Threads:\s+(\d+)", status, flags=re.M).group(1))
    return rss, threads, len(os.listdir(f"/proc/{pid}/fd"))


def start_server(args: argparse.Namespace, state_dir: str) -> tuple[subprocess.Popen, int]:
    """The server on loopback with a free port; returns it and its gRPC port."""
    model = args.model or str(ROOT / "yolov12_serve" / "assets" / "demo.onnx")
    cmd = [sys.executable, "-c", SERVE, "--engines", model, "--gpus", args.gpus, "--allow-synthetic", "--host",
           "127.0.0.1", "--port", "0",
           "--metrics-port", "-1", "--no-status", "--state-dir", state_dir, "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    for line in proc.stdout:
        m = re.search(r"gRPC on [\d.]+:(\d+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep the pipe empty
            return proc, int(m.group(1))
    raise SystemExit(f"the server did not start (exit status {proc.wait()})")


class Watcher:
    """One WatchDetections call on every camera, counting results (and error results) in a thread."""

    def __init__(self, client, ids: list[str]) -> None:
        self.results = 0
        self.errors = 0
        self.watch = client.watch(ids)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        import grpc

        try:
            for fd in self.watch:
                self.results += 1
                self.errors += bool(fd.error)
        except grpc.RpcError:
            pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cameras", type=int, default=8)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--readd-s", type=float, default=60.0, help="remove and add again one camera this often")
    p.add_argument("--swap-s", type=float, default=300.0, help="swap the engines this often (0: never)")
    p.add_argument("--sample-s", type=float, default=30.0)
    p.add_argument("--fps", type=float, default=10.0)
    p.add_argument("--size", default="640x360")
    p.add_argument("--gpus", default="cpu")
    p.add_argument("--model", help="engine file (default: the bundled demo model)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from yolov12_serve.client import Client

    with tempfile.TemporaryDirectory(prefix="yolov12-soak-") as state_dir:
        proc, port = start_server(args, state_dir)
        client = Client(f"127.0.0.1:{port}", timeout=60)
        try:
            client.wait_ready(120)
            ids = [f"cam{i}" for i in range(args.cameras)]
            for i, sid in enumerate(ids):
                client.add_stream(sid, f"synthetic://{sid}?fps={args.fps:g}&size={args.size}&seed={i}")
            watcher = Watcher(client, ids)
            rows = []
            t0 = time.monotonic()
            end = t0 + args.minutes * 60
            next_sample, next_readd = t0, t0 + args.readd_s
            next_swap = t0 + args.swap_s if args.swap_s > 0 else float("inf")
            readds = swaps = 0
            last = (t0, 0)
            while time.monotonic() < end and proc.poll() is None:
                now = time.monotonic()
                if now >= next_readd:
                    sid = ids[readds % len(ids)]
                    client.remove_stream(sid)
                    client.add_stream(sid, f"synthetic://{sid}?fps={args.fps:g}&size={args.size}&seed={100 + readds}")
                    readds += 1
                    next_readd += args.readd_s
                if now >= next_swap:
                    client.reload_engines(timeout=600)
                    swaps += 1
                    next_swap += args.swap_s
                if now >= next_sample:
                    rss, threads, fds = process_figures(proc.pid)
                    rate = (watcher.results - last[1]) / max(now - last[0], 1e-6)
                    last = (now, watcher.results)
                    rows.append([round(now - t0), f"{rss:.0f}", threads, fds, f"{rate:.1f}", readds, swaps])
                    print(f"{rows[-1][0]:>6} s  RSS {rss:7.1f} MB  threads {threads:3d}  fds {fds:3d}  "
                          f"{rate:6.1f} results/s  re-adds {readds}  swaps {swaps}", flush=True)
                    next_sample += args.sample_s
                time.sleep(0.2)
            rss, threads, fds = process_figures(proc.pid)
            rows.append([round(time.monotonic() - t0), f"{rss:.0f}", threads, fds, "", readds, swaps])
        finally:
            client.close()
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    print()
    print(f"soak on {machine()}: {args.cameras} cameras at {args.fps:g} fps {args.size}, {args.minutes:g} min, "
          f"a camera re-added every {args.readd_s:g} s, engines swapped every {args.swap_s:g} s")
    print(table(["s", "RSS MB", "threads", "fds", "results/s", "re-adds", "swaps"], rows))
    base = rows[1] if len(rows) > 2 else rows[0]  # the first sample is start-up: sessions still being built
    minutes = max((rows[-1][0] - base[0]) / 60, 1e-6)
    growth = (float(rows[-1][1]) - float(base[1])) / minutes
    print(f"from {base[0]} s to the end: RSS {base[1]} -> {rows[-1][1]} MB ({growth:+.2f} MB/min), threads "
          f"{base[2]} -> {rows[-1][2]}, fds {base[3]} -> {rows[-1][3]}; "
          f"{watcher.results} results ({watcher.errors} with an error)")


if __name__ == "__main__":
    main()
