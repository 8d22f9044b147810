"""A process per device (issue 28, --worker-processes): a device process killed with SIGKILL is started again and
its cameras and pushed streams resume while the API process stays SERVING; /metrics holds every process's series
under the names and labels a single process uses; streams are placed across the device processes and move
between them when a device's engine fails. Against the real server (subprocess, torch blocked) with real ONNX
engines behind fault switches (tests/fault_injection.py) over loopback gRPC."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import defaultdict

import grpc
import numpy as np
import pytest
from test_resilience import Reader, gauge
from test_server_harness import ServerProcess, wait_until

from yolov12_serve.client import make_frame
from yolov12_serve.processes import split_cores
from yolov12_serve.procs.ipc import Outbox, loads
from yolov12_serve.proto import detector_pb2 as pb

pytestmark = pytest.mark.timeout(300)

DEVICES = ["cpu:0", "cpu:1"]


def picture(stream_id: str, frame_id: int, rgb: tuple[int, int, int]) -> pb.Frame:
    return make_frame(np.full((96, 128, 3), rgb, np.uint8), stream_id, frame_id, encoding="png")


def device_pids(client) -> dict[str, int]:
    return {d.device: d.pid for d in client.server_info().device_status}


class HealthLog:
    """Every status grpc.health.v1 Watch reports for the whole server, in order."""

    def __init__(self, client) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self.statuses: list[str] = []
        self._call = health_pb2_grpc.HealthStub(client.channel).Watch(health_pb2.HealthCheckRequest(service=""))

        def read() -> None:
            try:
                for r in self._call:
                    self.statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
            except grpc.RpcError:
                pass

        threading.Thread(target=read, daemon=True).start()

    def close(self) -> None:
        self._call.cancel()


def test_split_cores_gives_each_cpu_device_its_own_share():
    assert split_cores(["cpu:0", "cpu:1"], [0, 1]) == {"cpu:0": [0], "cpu:1": [1]}
    assert split_cores(["cpu:0", "cpu:1", "cpu:2"], list(range(8))) == {"cpu:0": [0, 1, 2], "cpu:1": [3, 4, 5],
                                                                       "cpu:2": [6, 7]}
    assert split_cores(["cpu:0", "cpu:1", "cpu:2"], [0, 1]) == {"cpu:0": [0], "cpu:1": [1], "cpu:2": [0]}
    assert split_cores(["cuda:0", "cuda:1"], [0, 1]) == {"cuda:0": None, "cuda:1": None}  # GPUs: every core
    assert split_cores(["cpu"], [0, 1]) == {"cpu": None}


def test_the_outbox_batches_events_and_sums_counts():
    import multiprocessing

    a, b = multiprocessing.Pipe()
    box = Outbox(a, interval=0.05)
    for i in range(100):
        box.put(("r", "cam", 1, i))
        box.count("in", ("cam", 1))
    messages = [loads(b.recv_bytes())]
    while b.poll(0.3):
        messages.append(loads(b.recv_bytes()))
    box.close()
    events = [e for m in messages for e in m]
    assert len(messages) <= 3  # 100 results in one or two messages, not 100
    assert [e[3] for e in events if e[0] == "r"] == list(range(100))
    assert sum(e[2][("cam", 1)] for e in events if e[0] == "counts") == 100


def test_a_device_process_tells_an_error_when_it_happens_not_again_at_each_state_change(monkeypatch):
    """A camera decoded in a device process: its error goes to the API process ("st") when it happens, each retry
    too, and a later state change carries none. When the error rode along with every state change, the API
    process timed it anew when the camera streamed again: a camera back for a minute showed its old error as news
    ("refused (0 s ago)"). The API side is replayed as ProcessEvents.remote_state does it."""
    from types import SimpleNamespace

    from yolov12_serve import stream as stream_module
    from yolov12_serve.procs.host import _HostStream
    from yolov12_serve.sources.base import StreamState
    from yolov12_serve.stream import Stream

    clock = [100.0]
    monkeypatch.setattr(stream_module, "now", lambda: clock[0])
    sent: list[tuple] = []
    host = SimpleNamespace(outbox=SimpleNamespace(put=sent.append))
    args = ("door", "rtsp://cam/1", "rtsp", 0.0, 0.1, lambda s: None, lambda f, r: None, lambda s: None)
    there, here = _HostStream(host, *args), Stream(*args)

    def at(t: float, state: StreamState, error: str = "") -> None:
        clock[0] = t
        there.set_state(state, error)
        while sent:
            _, _, _, told, told_error = sent.pop(0)
            here.set_state(StreamState(told), told_error)

    at(100.0, StreamState.RECONNECTING, "ConnectionRefusedError: refused")
    at(101.0, StreamState.RECONNECTING, "ConnectionRefusedError: refused")  # the same again: news
    assert (here.last_error_at, here.failing_since) == (101.0, 100.0)
    at(130.0, StreamState.STREAMING)
    clock[0] = 190.0
    view = here.view()
    assert view.state == StreamState.STREAMING and view.last_error == "ConnectionRefusedError: refused"
    assert (view.last_error_age_s, view.failing_for_s) == (89.0, 0.0), view


def test_a_killed_device_process_is_restarted_and_its_streams_resume_while_the_server_stays_serving(tmp_path):
    srv = ServerProcess("--gpus", "cpu:2", "--worker-processes", "on", "--instances", "1", "--allow-synthetic",
                        "--slo-ms", "2000", "--process-late", faults=tmp_path)
    health = reader = None
    try:
        c = srv.client()
        c.wait_ready(60)
        health = HealthLog(c)
        pids = device_pids(c)
        assert set(pids) == set(DEVICES) and len(set(pids.values())) == 2 and srv.proc.pid not in pids.values()
        for i in range(4):
            c.add_stream(f"cam{i}", f"synthetic://cam{i}?fps=10&size=320x180")
        placed = {s.stream_id: s.device for s in c.list_streams()}
        assert set(placed.values()) == set(DEVICES)  # spread over both processes (by their measured costs)
        reader = Reader(c.watch())
        for sid in placed:
            first = reader.first(lambda fd, sid=sid: fd.stream_id == sid and not fd.error, 60)
            assert first.device == placed[sid]  # run by the process of the device it was placed on
        wait_until(lambda: all(max((fd.frame_id for fd in reader.seen if fd.stream_id == sid), default=0) >= 40
                               for sid in placed), 60, what="40 frames of every camera published")

        # a pushed stream, one frame in flight when its device's process dies
        frames = [picture("pushed", 0, (90, 120, 150))]
        more = threading.Event()
        answers: list[pb.FrameDetections | grpc.StatusCode] = []

        def push() -> None:
            def gen():
                i = 0
                while i < len(frames) or more.wait(30):
                    more.clear()
                    while i < len(frames):
                        yield frames[i]
                        i += 1
                    if len(frames) >= 3:
                        return
            try:
                answers.extend(c.detect(gen(), timeout=120))
            except grpc.RpcError as e:
                answers.append(e.code())

        pusher = threading.Thread(target=push, daemon=True)
        pusher.start()
        wait_until(lambda: answers, 60, what="the first pushed frame answered")
        victim = next(s.device for s in c.list_streams() if s.stream_id == "pushed")
        (tmp_path / f"delay-{victim.replace(':', '-')}").write_text("5")  # the next frame stays in flight
        frames.append(picture("pushed", 1, (10, 20, 30)))
        more.set()
        time.sleep(1.0)
        last = {sid: max(fd.frame_id for fd in reader.seen if fd.stream_id == sid) for sid in placed}
        refused = superseded(srv.metrics())  # results refused as older than one published: counted as superseded
        killed_at = time.monotonic()
        os.kill(pids[victim], signal.SIGKILL)
        wait_until(lambda: len(answers) >= 2, 30, what="the in-flight pushed frame answered")
        assert answers[1].frame_id == 1 and "stopped" in answers[1].error, answers[1]  # answered, not left hanging
        (tmp_path / f"delay-{victim.replace(':', '-')}").unlink()

        resumed: dict[str, float] = {}
        for sid in placed:  # every camera, on both devices, delivers newer frames again
            reader.first(lambda fd, sid=sid: fd.stream_id == sid and not fd.error and fd.frame_id > last[sid], 60)
            resumed[sid] = time.monotonic() - killed_at
        # the restarted process numbers the frames on from the last published (from 0 again, each result was
        # refused until the numbers caught up: a camera blind for as long as it had run, ~40 frames here)
        more_refused = {sid: superseded(srv.metrics())[sid] - refused[sid] for sid in placed}
        assert all(n < 20 for n in more_refused.values()), (more_refused, last)
        frames.append(picture("pushed", 2, (200, 20, 30)))
        more.set()
        pusher.join(60)
        assert len(answers) == 3 and not isinstance(answers[2], grpc.StatusCode) and not answers[2].error
        after = device_pids(c)
        assert after[victim] != pids[victim] and all(after[d] == pids[d] for d in DEVICES if d != victim)
        assert all(s.state == pb.STREAM_STATE_STREAMING and s.device == placed[s.stream_id]
                   for s in c.list_streams() if s.stream_id in placed)
        assert c.health() == "SERVING" and "NOT_SERVING" not in health.statuses[health.statuses.index("SERVING"):]
        assert gauge(srv.metrics(), "yolov12_worker_restarts_total", device=victim) == 1
        print(f"streams resumed {', '.join(f'{k} {v:.1f} s' for k, v in sorted(resumed.items()))} after the kill")
        rc, _ = srv.terminate()
        assert rc == 0
    finally:
        for x in (health, reader):
            if x is not None:
                x.close()
        srv.close()


def test_a_stopped_device_process_is_found_silent_and_started_again(tmp_path):
    """A device process frozen (SIGSTOP here; a wedged driver call holding its interpreter does the same) has its run
    supervisor and camera watchdog inside it: nothing noticed, its cameras stayed STREAMING without a result. The
    API process hears from each device process every quarter second: after 2 x --stall-s of silence it ends it
    and starts it again, and its cameras resume."""
    srv = ServerProcess("--gpus", "cpu:2", "--worker-processes", "on", "--instances", "1", "--allow-synthetic",
                        "--stall-s", "1.5", "--slo-ms", "2000", "--process-late")
    reader = None
    stopped = 0
    try:
        c = srv.client()
        c.wait_ready(60)
        pids = device_pids(c)
        for i in range(4):
            c.add_stream(f"cam{i}", f"synthetic://cam{i}?fps=10&size=320x180")
        placed = {s.stream_id: s.device for s in c.list_streams()}
        reader = Reader(c.watch())
        for sid in placed:
            reader.first(lambda fd, sid=sid: fd.stream_id == sid and not fd.error, 60)
        victim = placed["cam0"]
        stopped = pids[victim]
        os.kill(stopped, signal.SIGSTOP)
        t = time.monotonic()
        wait_until(lambda: device_pids(c)[victim] != stopped, 30, what="the stopped process replaced")
        for sid in placed:
            reader.first(lambda fd, sid=sid: fd.stream_id == sid and not fd.error and time.monotonic() > t + 4, 60)
        time.sleep(3.5)  # longer than the silence allowed: processes that report are left alone
        assert gauge(srv.metrics(), "yolov12_worker_restarts_total", device=victim) == 1
        other = next(d for d in DEVICES if d != victim)
        assert device_pids(c)[other] == pids[other] and device_pids(c)[victim] != stopped
        assert c.health() == "SERVING"
        assert re.search(rf"{victim}: the device process {stopped} has sent nothing for \d+ s", srv.log())
    finally:
        if stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)
        if reader is not None:
            reader.close()
        srv.close()


def superseded(text: str) -> dict[str, float]:
    """yolov12_frames_dropped_total{reason="superseded"} per stream."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^yolov12_frames_dropped_total\{reason="superseded",stream="([^"]+)"\} (\S+)$', text, flags=re.M)}


def test_a_failing_device_process_hands_its_streams_to_the_other(tmp_path):
    srv = ServerProcess("--gpus", "cpu:2", "--worker-processes", "on", "--instances", "1", "--allow-synthetic",
                        "--slo-ms", "2000", "--recheck-s", "0.5", faults=tmp_path)
    reader = None
    try:
        c = srv.client()
        c.wait_ready(60)
        for i in range(4):
            c.add_stream(f"cam{i}", f"synthetic://cam{i}?fps=10&size=320x180")
        reader = Reader(c.watch())
        (tmp_path / "fail-cpu-1").write_text("")
        wait_until(lambda: all(s.device == "cpu:0" for s in c.list_streams()), 60, what="every stream on cpu:0")
        assert c.health("yolov12.v1.Detector/cpu:1") == "NOT_SERVING" and c.health() == "SERVING"
        t = time.monotonic()
        for i in range(4):  # all served by cpu:0's process now
            fd = reader.first(lambda fd, i=i: fd.stream_id == f"cam{i}" and not fd.error and fd.device == "cpu:0"
                              and time.monotonic() > t, 60)
        (tmp_path / "fail-cpu-1").unlink()
        wait_until(lambda: c.health("yolov12.v1.Detector/cpu:1") == "SERVING", 60, what="cpu:1 back in service")
        assert fd.device == "cpu:0"
        before = {e.device: e.model_version for e in c.server_info().engines}
        engines = c.reload_engines()  # a hot swap: each device process loads, then all switch
        assert {e.device: e.model_version for e in engines} == before and len(engines) == 2
        t = time.monotonic()
        reader.first(lambda fd: not fd.error and time.monotonic() > t, 30)  # still serving after the swap
    finally:
        if reader is not None:
            reader.close()
        srv.close()


def _families(text: str) -> dict[str, frozenset[str]]:
    """metric name -> the label names its samples carry (watchers' labels vary by peer: only the names count)."""
    out: dict[str, set[str]] = defaultdict(set)
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? ", line)
        if m and not line.startswith("#"):
            out[m.group(1)] |= set(re.findall(r'(\w+)="', m.group(2) or ""))
    return {k: frozenset(v) for k, v in out.items()}


def test_metrics_of_every_process_in_one_exposition_with_a_single_process_s_names(tmp_path):
    texts = {}
    for mode in ("off", "on"):
        srv = ServerProcess("--gpus", "cpu:2", "--worker-processes", mode, "--instances", "1", "--allow-synthetic",
                            "--slo-ms", "2000")
        try:
            c = srv.client()
            c.wait_ready(60)
            for i in range(2):
                c.add_stream(f"cam{i}", f"synthetic://cam{i}?fps=10&size=320x180")
            watch = c.watch()
            devices = {s.stream_id: s.device for s in c.list_streams()}
            assert sorted(devices.values()) == DEVICES
            counts: dict[str, int] = defaultdict(int)
            for fd in watch:
                counts[fd.stream_id] += not fd.error
                if min(counts.values(), default=0) >= 5 and len(counts) == 2:
                    break
            text = srv.metrics()
            watch.cancel()
            texts[mode] = text
            if mode == "on":
                for device in DEVICES:  # each device process's batches and frames, in the API's /metrics
                    assert gauge(text, "yolov12_inference_seconds_count", device=device) >= 5
                    assert gauge(text, "yolov12_device_healthy", device=device) == 1
                for sid, device in devices.items():
                    assert gauge(text, "yolov12_frames_processed_total", device=device, stream=sid) >= 5
                    assert gauge(text, "yolov12_frames_total", stream=sid) >= 5
                    assert gauge(text, "yolov12_stream_state", stream=sid, state="STREAMING") == 1
        finally:
            srv.close()
    assert _families(texts["on"]) == _families(texts["off"])
    promtool = shutil.which("promtool")
    if promtool:
        out = subprocess.run([promtool, "check", "metrics"], input=texts["on"], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def test_frames_a_camera_sheds_in_a_device_process_count_as_offered_in_the_api_process(tmp_path):
    """Past capacity a camera in a device process sheds most of its frames at the source (Stream.admit); the API
    process still counts every one as offered and superseded (the device process sums them in its outbox): a
    100 fps camera on an engine that runs ~3 frames a second, beside four more, shows ~100 frames/s in frames_total,
    not only the few a second it hands over near its turns (nor one per tick it skipped ahead: Stream.shed_ahead)."""
    faults = tmp_path / "faults"
    faults.mkdir()
    for device in DEVICES:
        (faults / f"delay-{device.replace(':', '-')}").write_text("0.3")  # seconds per frame
    srv = ServerProcess("--gpus", "cpu:2", "--worker-processes", "on", "--instances", "1", "--allow-synthetic",
                        "--max-batch", "1", faults=faults)
    try:
        c = srv.client()
        c.wait_ready(60)
        c.add_stream("cam", "synthetic://cam?fps=100&size=320x180")
        for i in range(2, 6):  # two or more on cam's device: only the camera next in turn hands over frames
            c.add_stream(f"cam{i}", f"synthetic://cam{i}?fps=100&size=320x180")
        wait_until(lambda: (gauge(srv.metrics(), "yolov12_frames_processed_total", device=c.list_streams()[0].device,
                                  stream="cam") or 0) >= 3, 60)
        time.sleep(1.5)  # a second of measured overload: admission is on

        def counts() -> tuple[float, float, float]:
            text = srv.metrics()
            return (time.monotonic(), gauge(text, "yolov12_frames_total", stream="cam") or 0.0,
                    gauge(text, "yolov12_frames_dropped_total", reason="superseded", stream="cam") or 0.0)

        t0, offered0, superseded0 = counts()
        time.sleep(3)
        t1, offered1, superseded1 = counts()
        assert (offered1 - offered0) / (t1 - t0) >= 60, (offered0, offered1)
        assert (superseded1 - superseded0) / (t1 - t0) >= 50, (superseded0, superseded1)
    finally:
        srv.close()
