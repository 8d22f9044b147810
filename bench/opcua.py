"""What `--opcua` costs the API process: the real OpcUaServer fed through a Fanout, as the server feeds it, with a
real asyncua client in another process subscribed to every camera's LastObject.TrackId and Objects (a PLC driving a
reject gate); CPU of this process (the fan-out and the OPC UA thread, asyncua's publishing included) per result of 3
detections, on tracked and on untracked cameras, in turns; and the CPU of its once-a-second refresh of 64 idle
cameras. Printed as a table (not a test). Needs asyncua (the `opcua` extra).

    python bench/opcua.py                # 3 rounds of 5,000 results per arm, about a minute
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

_BENCH = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == _BENCH:
    sys.path[0] = str(_BENCH.parent)  # the repo root

import numpy as np  # noqa: E402

from yolov12_serve.fanout import Fanout  # noqa: E402
from yolov12_serve.frames import FrameResult  # noqa: E402
from yolov12_serve.opcua import NAMESPACE, OpcUaOptions, OpcUaServer  # noqa: E402
from yolov12_serve.sources.base import StreamState  # noqa: E402

NAMES = {0: "scratch", 1: "dent", 2: "crack"}
DETECTIONS = np.array([[10, 20, 50, 60, 0.9, 1], [100, 120, 150, 160, 0.8, 0], [200, 220, 250, 260, 0.7, 2]],
                      np.float32)
CAMERAS = 64

CLIENT = """
import asyncio, sys
from asyncua import Client, ua
async def main(url, cameras):
    async with Client(url, timeout=30) as c:
        ns = await c.get_namespace_index(sys.argv[3])
        class H:
            n = 0
            def datachange_notification(self, node, val, data): H.n += 1
        sub = await c.create_subscription(100, H())
        nodes = [c.get_node(ua.NodeId(f"Cameras.cam{i}.{v}", ns)) for i in range(cameras)
                 for v in ("LastObject.TrackId", "Objects")]
        await sub.subscribe_data_change(nodes)
        print("subscribed", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        print(H.n, flush=True)
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def _camera(i: int, tracked: bool) -> SimpleNamespace:
    view = SimpleNamespace(fps=25.0, latency_p99_ms=30.0)
    return SimpleNamespace(stream_id=f"cam{i}", epoch=1, tracker=object() if tracked else None,
                           state=StreamState.STREAMING, reconnects=0, picture_problem="", last_error="",
                           view=lambda: view)


def run(rounds: int, n: int) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"opc.tcp://127.0.0.1:{port}"
    fanout = Fanout()
    cameras = [_camera(i, True) for i in range(CAMERAS)]
    server = OpcUaServer(OpcUaOptions(url), streams=lambda: cameras, status=lambda: "serving", names=lambda r: NAMES,
                         class_names=lambda s: list(NAMES.values()),
                         subscribe=lambda loop: fanout.subscribe(None, 4 * n, loop))
    server.start()
    server.wait_started()
    time.sleep(1.0)  # the cameras' nodes made
    client = subprocess.Popen([sys.executable, "-c", CLIENT, url, str(CAMERAS), NAMESPACE], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert client.stdout is not None and client.stdin is not None
    assert client.stdout.readline().strip() == "subscribed"
    time.sleep(1.0)
    cpu = time.process_time()
    time.sleep(10.0)
    idle = (time.process_time() - cpu) / 10.0
    got: dict[bool, list[float]] = {True: [], False: []}
    frame = 0
    for r in range(rounds):
        for tracked in ((True, False) if r % 2 == 0 else (False, True)):
            results = []
            for i in range(n):
                frame += 1
                f = frame // CAMERAS
                track = np.array([f // 10 + 1, 0, 0]) if tracked else None  # a new object every 10 frames
                results.append(FrameResult(f"cam{i % CAMERAS}", f, DETECTIONS, (1080, 1920), int(time.time() * 1e6),
                                           0.02, "cpu", track_ids=track, epoch=1))
            before = server.results
            cpu = time.process_time()
            for result in results:
                fanout.publish(result)
            while server.results < before + n:
                time.sleep(0.005)
            time.sleep(0.3)  # asyncua's publishing of what changed last
            got[tracked].append(((time.process_time() - cpu) - 0.3 * idle) / n * 1e6)
    client.stdin.write("\n")
    client.stdin.flush()
    notifications = client.stdout.readline().strip()
    client.wait(30)
    fanout.close_all()
    server.close()
    print(f"\n{rounds} rounds of {n} results (3 detections each, {CAMERAS} cameras), one client subscribed to every "
          f"camera's LastObject.TrackId and Objects ({notifications} notifications)")
    print(f"idle: {idle * 1000:.1f} ms of CPU a second (states compared every 0.25 s, rates written every second)")
    print("| cameras | CPU per result, us (mean +- s.e.) | rounds |")
    print("|---|---|---|")
    for tracked, label in ((True, "tracked (a new object every 10 frames)"), (False, "untracked")):
        xs = got[tracked]
        se = statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0
        print(f"| {label} | {statistics.mean(xs):.0f} +- {se:.0f} | {', '.join(f'{x:.0f}' for x in xs)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--results", type=int, default=5000, help="results per arm and round")
    args = p.parse_args()
    run(args.rounds, args.results)


if __name__ == "__main__":
    main()
