"""What `--mqtt` costs the API process per published result: the real MqttPublisher fed through a Fanout, as the
server feeds it, publishing to a real mosquitto on loopback; CPU of this process (our thread and paho's) per
result of 3 detections on a tracked camera, with detections published, with --no-mqtt-detections, and as a
Sparkplug B edge node (--mqtt-sparkplug: objects counted, DDATA by exception), in turns; printed as a table (not a
test). Needs the mosquitto broker (scripts/setup test installs it).

    python bench/mqtt.py                 # 3 rounds of 5,000 results per arm, well under a minute
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

_BENCH = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == _BENCH:
    sys.path[0] = str(_BENCH.parent)  # the repo root

import numpy as np  # noqa: E402

from yolov12_serve.fanout import Fanout  # noqa: E402
from yolov12_serve.frames import FrameResult  # noqa: E402
from yolov12_serve.mqtt import MqttOptions, MqttPublisher  # noqa: E402
from yolov12_serve.sources import StreamState  # noqa: E402
from yolov12_serve.sparkplug import SparkplugPublisher  # noqa: E402

NAMES = {0: "scratch", 1: "dent", 2: "crack"}
DETECTIONS = np.array([[10, 20, 50, 60, 0.9, 1], [100, 120, 150, 160, 0.8, 0], [200, 220, 250, 260, 0.7, 2]],
                      np.float32)


def broker() -> tuple[subprocess.Popen, int]:
    """mosquitto on a free loopback port."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.access(binary, os.X_OK):
        sys.exit("bench/mqtt.py: mosquitto is not installed (scripts/setup test, or apt-get install mosquitto)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = Path(tempfile.mkdtemp(prefix="bench-mqtt-")) / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    + ("user root\n" if os.geteuid() == 0 else ""))
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    proc.kill()
    sys.exit("bench/mqtt.py: mosquitto did not start")


ARMS = ("detections", "objects", "sparkplug")
LABELS = {"detections": "detections, objects", "objects": "objects only (--no-mqtt-detections)",
          "sparkplug": "Sparkplug B (--mqtt-sparkplug), tracked cameras"}


def _camera(i: int) -> SimpleNamespace:
    """What the Sparkplug publisher reads of a tracked, streaming camera (camera_tags.py)."""
    view = SimpleNamespace(fps=25.0, latency_p99_ms=30.0)
    return SimpleNamespace(stream_id=f"cam{i}", epoch=1, tracker=object(), state=StreamState.STREAMING, reconnects=0,
                           picture_problem="", last_error="", view=lambda: view)


def cost_per_result_us(port: int, arm: str, n: int) -> tuple[float, float]:
    """CPU microseconds of this process per result published (the publisher's thread and paho's), less what the
    publisher spends idle meanwhile (Sparkplug compares states and rates every 0.25 s with or without results);
    and that idle cost, ms of CPU a second."""
    fanout = Fanout()
    sent: list[str] = []
    if arm == "sparkplug":
        cameras = [_camera(i) for i in range(64)]
        options = MqttOptions(f"mqtt://127.0.0.1:{port}", queue=10 * n, sparkplug="bench/edge")
        publisher: MqttPublisher = SparkplugPublisher(
            options, fanout.subscribe(None, 2 * n), streams=lambda: cameras, status=lambda: "serving",
            names=lambda r: NAMES, class_names=lambda s: list(NAMES.values()), on_sent=sent.append)
    else:
        publisher = MqttPublisher(MqttOptions(f"mqtt://127.0.0.1:{port}/bench", detections=arm == "detections",
                                              queue=10 * n), fanout.subscribe(None, 2 * n), names=lambda r: NAMES,
                                  states=lambda: {}, on_sent=sent.append)
    publisher.start()
    while not publisher._connected:
        time.sleep(0.01)
    time.sleep(1.0)  # the births (Sparkplug) sent, then idle
    idle = time.process_time()
    time.sleep(2.0)
    idle = (time.process_time() - idle) / 2.0
    results = [FrameResult(f"cam{i % 64}", i // 64, DETECTIONS, (1080, 1920), 1, 0.02, "cpu", epoch=1,
                           track_ids=np.array([i // 64 // 10 + 1, 0, 0])) for i in range(n)]  # a new object / 10 frames
    cpu, wall = time.process_time(), time.monotonic()
    for r in results:
        fanout.publish(r)
    while len(publisher._sub):  # the queue drained by the publisher's thread
        time.sleep(0.005)
    time.sleep(0.3)  # paho's thread sends what is left (and Sparkplug's next DDATA goes)
    cpu = (time.process_time() - cpu) - idle * (time.monotonic() - wall)
    fanout.close_all()
    publisher.close()
    return cpu / n * 1e6, idle * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--results", type=int, default=5000, help="results per arm and round")
    args = p.parse_args()
    proc, port = broker()
    got: dict[str, list[float]] = {arm: [] for arm in ARMS}
    idle: dict[str, list[float]] = {arm: [] for arm in ARMS}
    try:
        for r in range(args.rounds):
            for arm in ARMS[r % len(ARMS):] + ARMS[:r % len(ARMS)]:  # the arms take turns going first
                per_result, idle_ms = cost_per_result_us(port, arm, args.results)
                got[arm].append(per_result)
                idle[arm].append(idle_ms)
    finally:
        proc.terminate()
    print(f"\n{args.rounds} rounds of {args.results} results (3 detections each, 64 cameras), mosquitto on loopback")
    print("| published | CPU per result, us (mean +- s.e.) | rounds | idle, ms of CPU a second |")
    print("|---|---|---|---|")
    for arm in ARMS:
        xs, label = got[arm], LABELS[arm]
        se = statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0
        print(f"| {label} | {statistics.mean(xs):.0f} +- {se:.0f} | {', '.join(f'{x:.0f}' for x in xs)} | "
              f"{statistics.mean(idle[arm]):.1f} |")


if __name__ == "__main__":
    main()
