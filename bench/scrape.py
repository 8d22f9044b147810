"""What a Prometheus scrape costs the frames being served (one process): frames over the SLO or dropped late
while /metrics is scraped over HTTP every 2 s, rendered paced (as served: metrics.PacedScrape) or at once, and
with no scrape; printed as a table (not a test).

Each measurement is a fresh server in a process of its own (ServerCore on the zero-cost model of
tests/zero_model.py, 2 instances, --max-batch 32, the server's thread priorities and switch interval) with
synthetic cameras at 320x180@25 (128 by default: 3,200 frames/s, under one process's capacity on 2 cores);
8 s to settle, then a 20 s window. The three arms take turns in every round, their order alternating.

    python bench/scrape.py                  # 5 rounds, about 7 minutes on 2 cores
    python bench/scrape.py --rounds 1 --cameras 380
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == _BENCH:
    sys.path[0] = str(_BENCH.parent)  # the repo root: bench/engines.py must not shadow the engines package
sys.path.insert(1, str(_BENCH.parent / "tests"))

from bench._common import machine, table, write_result  # noqa: E402
from bench.hostpath import mean_se  # noqa: E402

ARMS = ("paced", "at once", "no scrape")


def _total(text: str, name: str, **labels: str) -> float:
    found = re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M)
    return sum(float(v) for lab, v in found if all(f'{k}="{x}"' in lab for k, x in labels.items()))


def measure(arm: str, cameras: int, every_s: float, warm: float, seconds: float) -> dict:
    """One server, one arm (run in a process of its own: the synthetic cameras' ticker is process-wide)."""
    sys.modules["torch"] = None  # type: ignore[assignment] - the server path never needs it
    import gc

    from bench.hostpath import zero_model
    from yolov12_serve import priority
    from yolov12_serve.config import ServerConfig, StreamSpec
    from yolov12_serve.core import ServerCore

    core = ServerCore(ServerConfig(engines=[str(zero_model())], devices=["cpu"], instances=2, max_batch=32,
                                   metrics_port=0, allow_synthetic=True, max_streams=cameras + 10))
    core.start()
    if arm == "at once":
        core.metrics.scrape.work_s = float("inf")
    port = core.metrics.serve(0, "127.0.0.1")
    priority.lower_others(0, True)  # as the app does once the workers run
    priority.shorten_lock_turns()
    gc.freeze()
    for i in range(cameras):
        core.add_stream(StreamSpec(f"cam{i}", f"synthetic://cam{i}?fps=25&size=320x180&seed={i % 4}"))
    walls: list[float] = []

    def scrape() -> None:
        while True:
            time.sleep(every_s)
            t = time.monotonic()
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60).read()
            walls.append(time.monotonic() - t)

    if arm != "no scrape":
        threading.Thread(target=scrape, daemon=True).start()
    time.sleep(warm)

    def read() -> dict:
        text = core.metrics.exposition().decode()
        return {"t": time.monotonic(), "processed": _total(text, "yolov12_frames_processed_total"),
                "late": _total(text, "yolov12_frames_dropped_total", reason="late"),
                "over": _total(text, "yolov12_frame_latency_seconds_count")
                - _total(text, "yolov12_frame_latency_seconds_bucket", le=str(core.config.slo_ms / 1000))}

    a = read()
    time.sleep(seconds)
    b = read()
    dt = b["t"] - a["t"]
    return {"arm": arm, "processed": (b["processed"] - a["processed"]) / dt,
            "missed": (b["over"] - a["over"] + b["late"] - a["late"]) / dt,
            "scrape_s": sum(walls) / len(walls) if walls else 0.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cameras", type=int, default=128)
    parser.add_argument("--every", type=float, default=2.0, help="seconds between scrapes")
    parser.add_argument("--warm", type=float, default=8.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # one measurement, in a child process
    args = parser.parse_args()
    if args.rounds < 1 or args.cameras < 1 or args.every <= 0 or args.seconds <= 0 or args.warm < 0:
        parser.error("--rounds, --cameras, --every and --seconds must be positive (--warm 0 or more)")
    if args.arm:
        print(json.dumps(measure(args.arm, args.cameras, args.every, args.warm, args.seconds)), flush=True)
        os._exit(0)  # the server's threads are not worth stopping one by one
    print(f"machine: {machine()}", flush=True)
    rows = []
    for r in range(args.rounds):
        for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
            out = subprocess.run([sys.executable, __file__, "--arm", arm, "--cameras", str(args.cameras), "--every",
                                  str(args.every), "--warm", str(args.warm), "--seconds", str(args.seconds)],
                                 capture_output=True, text=True, timeout=args.warm + args.seconds + 120)
            if out.returncode != 0 or not out.stdout.strip():
                print(f"scrape: the {arm} run failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                return 1
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"round {r} {arm:>9}: processed {row['processed']:,.0f}/s, over the SLO or late "
                  f"{row['missed']:.1f}/s, a scrape {row['scrape_s']:.2f} s", flush=True)
    body = [[arm, mean_se([x["missed"] for x in rows if x["arm"] == arm]),
             mean_se([x["processed"] for x in rows if x["arm"] == arm]),
             mean_se([x["scrape_s"] for x in rows if x["arm"] == arm]) if arm != "no scrape" else "-"]
            for arm in ARMS]
    report = "\n".join([
        f"# A scrape's cost to the frames served ({time.strftime('%Y-%m-%d')})", "",
        f"Machine: {machine()}. One process, {args.cameras} synthetic cameras (320x180@25), zero-cost model; "
        f"/metrics scraped every {args.every:g} s; {args.rounds} rounds of {args.seconds:g} s windows after "
        f"{args.warm:g} s, arms taking turns; mean ± standard error over rounds.", "",
        table(["/metrics", "frames over the SLO or late per s", "processed/s", "a scrape takes (s)"], body), ""])
    print(report)
    print(f"written to {write_result('scrape.md', report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
