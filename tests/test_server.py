"""The server as a program: `yolov12-serve` command line, --demo, SIGTERM drain, no torch on the serving path,
and the configuration it validates (stream ids, URLs, streams files, --gpus)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from test_server_harness import NO_TORCH, ROOT, ServerProcess, has_ipv6_loopback, model_path

from engines.base import Engine, EngineInfo
from yolov12_serve.config import load_streams_file, redact_url, url_kind, validate_stream_id
from yolov12_serve.devices import parse_gpus
from yolov12_serve.errors import ConfigError, InvalidArgumentError

pytestmark = pytest.mark.timeout(180)


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    code = NO_TORCH + "from yolov12_serve.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


# ------------------------------------------------------------------------------------------------ the program
def _console_scripts() -> dict[str, str]:
    from importlib.metadata import distribution

    return {ep.name: ep.value for ep in distribution("yolov12-serve").entry_points if ep.group == "console_scripts"}


@pytest.mark.parametrize("name", sorted(_console_scripts()))
def test_every_command_says_its_version(name, capsys):
    """What a bug report or an upgrade check asks first: `yolov12-serve --version` and the like, for every command
    the package installs (a new one without it fails here)."""
    import importlib

    from yolov12_serve import __version__

    module, function = _console_scripts()[name].split(":")
    main = getattr(importlib.import_module(module), function)
    try:
        status = main(["--version"])
    except SystemExit as e:
        status = e.code
    assert (status, capsys.readouterr().out) == (0, f"{name} {__version__}\n")


def test_sigterm_drains_and_exits_zero_within_10_s(tmp_path):
    cams = tmp_path / "cams.yaml"
    cams.write_text("streams:\n  - {id: line2-cam1, url: 'synthetic://b?fps=15', max_fps: 10}\n")
    srv = ServerProcess("--source", "synthetic://a?fps=15", "--streams", str(cams), "--allow-synthetic")
    try:
        c = srv.client()
        c.wait_ready(30)
        assert sorted(s.stream_id for s in c.list_streams()) == ["cam0", "line2-cam1"]
        watch = c.watch()
        first = next(watch)
        assert first.stream_id in ("cam0", "line2-cam1")
        ended = threading.Event()
        outcome: list[object] = []

        def drain_watch():
            try:
                for _ in watch:
                    pass
                outcome.append("ended")
            except grpc.RpcError as e:
                outcome.append(e.code())
            ended.set()

        threading.Thread(target=drain_watch, daemon=True).start()
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        statuses: list[str] = []
        health = health_pb2_grpc.HealthStub(c.channel).Watch(health_pb2.HealthCheckRequest(service=""))

        def watch_health():
            try:
                for r in health:
                    statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
            except grpc.RpcError:
                pass

        threading.Thread(target=watch_health, daemon=True).start()
        time.sleep(0.3)
        rc, seconds = srv.terminate()
        assert rc == 0, srv.log()
        assert seconds < 10
        assert ended.wait(5), "the watcher was left hanging"
        assert outcome[0] in ("ended", grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert "drained" in srv.log()
        assert statuses[0] == "SERVING" and "NOT_SERVING" in statuses  # load balancers see the drain
    finally:
        srv.close()


def test_demo_into_a_log_prints_no_live_table_unless_asked():
    """--demo's live table went to a journal or `docker logs` too: a block of lines every second (a line per camera,
    29,000 lines an hour for four). Off when stdout is not a terminal; --status still asks for it; the summary stays."""
    srv = ServerProcess("--demo", "--duration", "4", "--engines", str(model_path()))
    try:
        rc = srv.proc.wait(60)
        out = srv.log()
        assert rc == 0, out
        assert "summary after" in out and "gRPC :" not in out, out  # the summary, and no live table's title
    finally:
        srv.close()


def test_demo_runs_four_cameras_shows_the_table_and_a_summary():
    srv = ServerProcess("--demo", "--duration", "6", "--status", "--engines", str(model_path()))
    try:
        rc = srv.proc.wait(60)
        out = srv.log()
        assert rc == 0, out
        assert "p99 ms" in out and "line1-cam4" in out  # the live table
        assert out.count("gRPC :") == 1, out  # into a log (stdout a pipe): after a second, then every 30 s
        assert f"yolov12-ctl --server 127.0.0.1:{srv.port} streams" in out  # and how to drive it from a shell
        summary = out[out.index("summary after"):]
        assert all(f"line1-cam{i}" in summary for i in range(1, 5)) and "results/s" in summary
        header, *rows = summary.splitlines()[1:6]
        end = header.index("objects") + len("objects")
        assert all(row[:end].split()[-1].isdigit() for row in rows), summary  # the demo cameras count their parts
    finally:
        srv.close()


@pytest.mark.parametrize("args,message", [
    (["--engines", "x.onnx", "--gpus", "7"], "GPU 7 not present"),
    (["--engines", "x.onnx", "--gpus", "zero"], "--gpus"),
    (["--engines", "/nonexistent/model.onnx", "--gpus", "cpu", "--port", "0", "--metrics-port", "-1"],
     "engine file not found"),
    (["--gpus", "cpu"], "no engine given"),
    (["--engines", "a.onnx,b.onnx", "--gpus", "cpu"], "2 files for 1 devices"),
    (["--engines", "x.onnx", "--gpus", "cpu", "--slo-ms", "0"], "--slo-ms must be a positive number"),
    (["--engines", "x.onnx", "--gpus", "cpu", "--port", "99999"], "--port must be 0..65535"),
    (["--engines", "x.onnx", "--gpus", "cpu", "--metrics-port", "70000"], "--metrics-port must be -1..65535"),
    (["--engines", "x.onnx", "--gpus", "cpu", "--host", "192.0.2.1", "--port", "5000"], "check --host"),
    # a bad camera URL is reported before anything loads (x.onnx does not exist: it would say so later)
    (["--engines", "x.onnx", "--gpus", "cpu", "--source", "ftp://cam"], "stream cam0: unsupported url 'ftp://cam'"),
    (["--engines", "x.onnx", "--gpus", "cpu", "--source", "/videos/line1.mp4"], "start the server with --allow-files"),
    (["--engines", "x.onnx", "--gpus", "cpu", "--allow-files", "--source", "/videos/line1.mp4"],
     "stream cam0: no such video file: /videos/line1.mp4"),  # it started, then logged the camera failed
    (["--engines", "/tmp", "--gpus", "cpu"], "engine path /tmp is a directory: give an .onnx, .engine or .pt file"),
    (["--engines", "x.onnx", "--gpus", "cpu", "--allow-synthetic", "--source", "synthetic://belt?fps=0"],
     "stream cam0: synthetic url"),
    (["--engines", "x.onnx", "--gpus", "cpu", "--source", "synthetic://belt"], "stream cam0: synthetic:// demo cameras "
     "are off on this server: start it with --allow-synthetic (or --demo)"),
    (["--engines", "x.onnx", "--gpus", "cpu", "--state-dir", "/tmp/s", "--no-state"], "contradict each other"),
    (["--engines", "x.onnx", "--gpus", "cpu", "--blind-after-s", "-1"], "--blind-after-s must be 0 (never) or more"),
    (["--engines", "x.onnx", "--gpus", "cpu", "--track-min-score", "1.5"], "--track-min-score must be 0..1"),
    (["--gpus", "cpu", "--engines", str(model_path()), "--port", "0", "--metrics-port", "-1", "--state-dir",
      "/proc/no-such/state"], "cannot keep the stream set in /proc/no-such/state"),
    (["--gpus", "cpu", "--engines", str(model_path()), "--port", "0", "--metrics-port", "-1", "--no-state",
      "--evidence-dir", "/proc/no-such/evidence"], "--evidence-dir /proc/no-such/evidence: No such file or directory"),
    # a file in the way: a start said "File exists" / "Not a directory", where --check said it clearly
    (["--gpus", "cpu", "--engines", str(model_path()), "--port", "0", "--metrics-port", "-1", "--state-dir",
      "/etc/passwd"], "--state-dir /etc/passwd: /etc/passwd is a file, not a folder"),
    (["--gpus", "cpu", "--engines", str(model_path()), "--port", "0", "--metrics-port", "-1", "--state-dir",
      "/etc/passwd/state"], "--state-dir /etc/passwd/state: /etc/passwd is a file, not a folder"),
    (["--gpus", "cpu", "--engines", str(model_path()), "--port", "0", "--metrics-port", "-1", "--no-state",
      "--evidence-dir", "/etc/passwd"], "--evidence-dir /etc/passwd: /etc/passwd is a file, not a folder"),
    (["--gpus", "cpu", "--engines", str(model_path()), "--port", "0", "--metrics-port", "-1", "--no-state",
      "--evidence-dir", "/etc/passwd/evidence"], "--evidence-dir /etc/passwd/evidence: /etc/passwd is a file, "
     "not a folder"),
    (["--engines", "x.onnx", "--gpus", "cpu", "--evidence-dir", "/tmp/e", "--evidence-max-mb", "0"],
     "--evidence-max-mb must be positive"),
    # it was taken and ignored: no evidence is written without --evidence-dir (also with --check, below)
    (["--engines", "x.onnx", "--gpus", "cpu", "--evidence-max-mb", "500"], "--evidence-max-mb caps the "
     "--evidence-dir folder: give --evidence-dir too"),
    (["--engines", str(model_path()), "--gpus", "cpu", "--evidence-max-mb", "500", "--check"],
     "give --evidence-dir too"),
    # NaN passed every '< 0' check; inf ended in a traceback from the latency histogram's buckets
    (["--engines", "x.onnx", "--gpus", "cpu", "--slo-ms", "inf"], "--slo-ms must be a finite number, got inf"),
    (["--engines", "x.onnx", "--gpus", "cpu", "--stall-s", "nan"], "--stall-s must be a finite number, got nan"),
    (["--engines", "x.onnx", "--gpus", "cpu", "--instances", "100000"], "--instances must be at most 64"),
    (["--engines", "x.onnx", "--gpus", "cpu", "--threads", "100000"], "--threads must be at most 256"),
    (["--engines", "x.onnx", "--gpus", "cpu", "--max-message-mb", "0"], "--max-message-mb must be at least 0.1"),
    (["--engines", "x.onnx", "--gpus", "cpu", "--rebalance-s", "-1"], "--rebalance-s must be 0 (never) or more"),
    (["--engines", "x.onnx", "--gpus", "cpu", "--duration", "0"], "--duration must be positive"),
    (["--engines", "x.onnx", "--gpus", "cpu", "--streams", str(model_path())], "is not a text file"),  # a binary
    (["--port", "abc"], "argument --port: invalid int value: 'abc' (see --help)"),  # not the 60-flag usage block
    # a models folder: --check called its empty suffix "unknown engine format ''"
    (["--engines", str(model_path().parent), "--gpus", "cpu", "--check"], "is a directory, not an engine file"),
])
def test_bad_command_lines_exit_2_with_one_line(args, message):
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and " INFO " not in ln]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_check_says_what_a_start_would_use_beside_a_running_server(tmp_path):
    """--check starts nothing: it passes with the gRPC and metrics ports held by another process (the running
    server), and says what a start would use; the engine is read, the cameras' classes checked against it."""
    streams = tmp_path / "cameras.yaml"
    streams.write_text("streams:\n  - {id: belt, url: 'rtsp://10.0.0.5/s', classes: [dent], track: true}\n"
                       "  - {id: press, url: 'rtsp://10.0.0.6/s', class_min_scores: {crack: 0.3}}\n")
    state = tmp_path / "state"
    with socket.socket() as grpc_port, socket.socket() as metrics_port:
        for s in (grpc_port, metrics_port):
            s.bind(("127.0.0.1", 0))
            s.listen()
        r = run_cli("--engines", str(model_path()), "--gpus", "cpu", "--streams", str(streams), "--host", "127.0.0.1",
                    "--port", str(grpc_port.getsockname()[1]), "--metrics-port", str(metrics_port.getsockname()[1]),
                    "--state-dir", str(state), "--evidence-dir", str(tmp_path / "evidence"), "--check")
    assert r.returncode == 0, r.stderr
    assert "the configuration is good" in r.stdout and "2 at start (1 tracked)" in r.stdout, r.stdout
    assert f"engine   cpu: {model_path()} (fp32" in r.stdout and "5 classes" in r.stdout, r.stdout
    assert f"state    {state}: to be created" in r.stdout and "plaintext, no tokens" in r.stdout, r.stdout
    assert "capped at 1024 MB" in r.stdout, r.stdout  # --evidence-max-mb's default, with --evidence-dir
    assert not state.exists() and not (tmp_path / "evidence").exists()  # checked, not made


def test_check_stops_at_what_a_start_would_stop_at(tmp_path):
    """Each in one line, exit 2: a class the model lacks (a start would refuse the camera), an evidence folder below
    a file, an engine file that is missing, a certificate that is none."""
    streams = tmp_path / "cameras.yaml"
    streams.write_text("streams:\n  - {id: belt, url: 'rtsp://10.0.0.5/s', class_min_scores: {scrach: 0.3}}\n")
    taken = tmp_path / "taken"
    taken.write_text("")
    base = ["--gpus", "cpu", "--check", "--no-state"]
    for args, message in [
        (["--engines", str(model_path()), "--streams", str(streams)], "unknown classes ['scrach'] for stream belt"),
        (["--engines", str(model_path()), "--evidence-dir", str(taken / "x")], f"{taken} is a file, not a folder"),
        (["--engines", str(tmp_path / "gone.onnx")], "gone.onnx"),
        (["--engines", str(model_path()), "--tls-cert", str(taken), "--tls-key", str(taken)],
         f"--tls-cert {taken} is not a certificate in PEM format"),
    ]:
        r = run_cli(*base, *args)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip() and " INFO " not in ln]
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], (args, r.stderr)
        assert "configuration is good" not in r.stdout


@pytest.mark.parametrize("flag, what, values", [("--health-port", "health checks", "0: any free port"),
                                                 ("--metrics-port", "metrics", "0: any free port, -1: off")])
def test_a_health_or_metrics_port_in_use_is_one_line(flag, what, values):
    """It was the line, then gRPC's own bind error before it and an 'Event loop is closed' traceback after it (the
    main port, open already, was never closed)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = ["--metrics-port", "-1"] if flag == "--health-port" else []
        r = run_cli("--engines", str(model_path()), "--gpus", "cpu", "--host", "127.0.0.1", "--port", "0", *other,
                    "--no-state", flag, str(port))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and " INFO " not in ln]
    assert r.returncode == 2 and lines == [f"yolov12-serve: error: cannot listen for {what} on 127.0.0.1:{port}:"
                                           " the port is in use (another yolov12-serve?); pick another with "
                                           f"{flag} ({values})"], r.stderr


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
@pytest.mark.parametrize("host, shown", [("::", "[::]"), ("[::1]", "[::1]")])
def test_an_ipv6_host_serves_grpc_health_and_metrics(host, shown):
    """--host '::' (every interface, IPv6 and IPv4 on a dual-stack host) or an IPv6 address, bare or bracketed as in
    a URL: gRPC needs it bracketed before its port, sockets and HTTP want it bare. '::' was 'cannot listen for gRPC
    on :::0' and '[::]' 'cannot serve metrics on [::]:0: Name or service not known', so no IPv6 spelling started."""
    from yolov12_serve.client import Client

    srv = ServerProcess("--host", host, "--health-port", "0", "--no-status")
    try:
        line = "".join(srv.output)
        health = int(re.search(r"health also on \[[0-9a-f:]+\]:(\d+)", line).group(1))
        assert f"gRPC on {shown}:{srv.port}, metrics on {shown}:{srv.metrics_port}/metrics" in line, line
        for port in (srv.port, health):
            with Client(f"[::1]:{port}") as c:
                c.wait_ready(60)
                assert c.health() == "SERVING"
        with urllib.request.urlopen(f"http://[::1]:{srv.metrics_port}/metrics", timeout=10) as r:
            assert b"yolov12_slo_seconds" in r.read()
    finally:
        srv.close()


def test_a_broken_streams_file_is_one_line_saying_where():
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "cams.yaml"
        bad.write_text("streams: [\n")
        r = run_cli("--engines", "x.onnx", "--gpus", "cpu", "--streams", str(bad))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and " INFO " not in ln]
    assert r.returncode == 2 and len(lines) == 1 and "not valid YAML at line 2, column 1" in lines[0], r.stderr


@pytest.mark.parametrize("which", ["--port", "--metrics-port"])
def test_a_port_in_use_is_one_line_naming_the_option(which):
    with socket.create_server(("0.0.0.0", 0)) as held:  # a second server on the same port, as a newcomer might
        port = str(held.getsockname()[1])
        other = "--metrics-port" if which == "--port" else "--port"
        ports = [which, port, other, "0"]
        r = run_cli("--demo", "--gpus", "cpu", "--duration", "5", *ports)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and " INFO " not in ln]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert f":{port}" in lines[0] and "in use" in lines[0] and f"pick another with {which}" in lines[0], r.stderr
    assert "(model " not in r.stderr, "said before the engines load, not after"


def test_the_start_up_heap_is_frozen_out_of_garbage_collections():
    """A full collection of the ~36k start-up objects held the GIL for 30-40 ms (most of the SLO) on 2 cores."""
    code = (NO_TORCH + "import gc; from yolov12_serve.cli import main; rc = main(sys.argv[1:]); "
            "print('frozen', gc.get_freeze_count()); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "--engines", str(model_path()), "--port", "0", "--metrics-port",
                        "-1", "--allow-synthetic", "--source", "synthetic://a?fps=5", "--duration", "0.5"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    frozen = [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("frozen ")]
    assert r.returncode == 0 and frozen and frozen[0] > 10_000, r.stdout + r.stderr


def _threads(pid: int) -> dict[int, tuple[int, int, int]]:
    """{thread id: (nice, scheduling policy, CPU ticks)} of a process, from /proc."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[16]), int(fields[38]), int(fields[11]) + int(fields[12]))
    return out


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_an_inference_thread_started_from_a_batch_thread_returns_to_the_default_policy():
    """Threads inherit their creator's policy: a worker started after lower_others must not run as a batch thread."""
    from yolov12_serve import priority

    seen = []

    def worker() -> None:
        tid = threading.get_native_id()
        os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))  # as inherited from a lowered thread
        seen.append(priority.policy_of(tid))
        priority.keep_default()
        seen.append(priority.policy_of(tid))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [os.SCHED_BATCH, os.SCHED_OTHER]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread priorities are read from Linux's /proc")
def test_inference_threads_keep_the_default_priority_and_all_else_yields():
    """Camera ticks and gRPC sends that preempt a run delay every frame in it: they run under SCHED_BATCH (never
    preempting on wake-up) at full weight (a lower nice got them preempted holding the GIL: see priority.py)."""
    batch, other = os.SCHED_BATCH, os.SCHED_OTHER
    srv = ServerProcess("--source", "synthetic://a?fps=15", "--log-level", "DEBUG", "--allow-synthetic")
    try:
        srv.client().wait_ready(30)
        m = re.search(r"CPU priority: \d+ threads under SCHED_BATCH at nice 0; threads \[([\d, ]+)\] at the default",
                      srv.log())
        assert m, srv.log()
        favoured = {int(t) for t in m.group(1).split(",")}
        watch = srv.client().watch()
        next(watch)  # the camera has rendered its belt and frames flow
        watch.cancel()
        before = _threads(srv.proc.pid)
        time.sleep(3)
        after = _threads(srv.proc.pid)
        assert after[srv.proc.pid][:2] == (0, batch)  # the main thread: asyncio, gRPC handlers
        busiest = max(after, key=lambda t: after[t][2] - before.get(t, (0, 0, 0))[2])  # a worker (or an engine's)
        assert busiest in favoured and after[busiest][:2] == (0, other), (busiest, favoured, after)
        assert all(after[t][:2] == (0, other) for t in favoured if t in after)
        srv.client().add_stream("late", "synthetic://late?fps=5")  # its thread is started by a lowered one
        new = set(_threads(srv.proc.pid)) - set(after)
        assert new and all(_threads(srv.proc.pid)[t][1] == batch for t in new)
    finally:
        srv.close()
    niced = ServerProcess("--source", "synthetic://a?fps=5", "--no-background-batch", "--background-nice", "7",
                          "--allow-synthetic")
    try:
        niced.client().wait_ready(30)
        threads = _threads(niced.proc.pid)
        assert {policy for _, policy, _ in threads.values()} <= {other, os.SCHED_IDLE}  # idle: ORT's builder
        assert threads[niced.proc.pid][0] == 7 and {nice for nice, _, _ in threads.values()} == {0, 7}
    finally:
        niced.close()
    r = run_cli("--demo", "--gpus", "cpu", "--background-nice", "20")
    assert r.returncode == 2 and "--background-nice must be 0..19" in r.stderr.strip().splitlines()[-1], r.stderr


def test_a_pt_or_tensorrt_engine_without_torch_is_one_line_saying_what_to_install(tmp_path):
    """The serving install has no torch, nor had production.md's `pip install ".[gpu]"` for TensorRT engines
    (whose buffers are torch CUDA tensors): a .pt or .engine given to it ended in a traceback of
    "No module named 'torch'". It is an EngineError with the fix, one line from yolov12-serve."""
    from engines.metadata import read_info, write_engine_file
    from yolov12_serve.demo import demo_model

    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"a checkpoint")
    r = run_cli("--engines", str(checkpoint), "--gpus", "cpu", "--no-state", "--no-status", "--port", "0",
                "--metrics-port", "-1")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "a .pt engine needs PyTorch" in r.stderr and "pip install torch" in r.stderr, r.stderr
    plan = write_engine_file(tmp_path / "m.engine", read_info(demo_model()), b"plan")
    code = NO_TORCH + f"import engines; engines.load({str(plan)!r}, device='cuda:0')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "EngineError: a TensorRT engine (its input and output buffers are torch CUDA tensors) needs PyTorch" \
        in r.stderr, r.stderr


def test_serving_imports_no_torch():
    """The whole serving path (engines, sources, API) imported with torch blocked, and none of it pulls torch in."""
    code = ("import sys; import yolov12_serve.cli, yolov12_serve.app, yolov12_serve.api, yolov12_serve.client, "
            "yolov12_serve.sources.rtsp, yolov12_serve.sources.synthetic, yolov12_serve.sources.push, engines; "
            "import engines.onnxruntime; from yolov12_serve.sources.synthetic import render_strip, SyntheticCamera; "
            "render_strip(SyntheticCamera('x', size=(64, 96))); "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


# ------------------------------------------------------------------------------------------------ configuration
def test_stream_ids_and_urls():
    assert validate_stream_id("line1-cam3") == "line1-cam3"
    for bad in ("", "a b", "x" * 129, "tab\there", "caf\u00e9"):
        with pytest.raises(InvalidArgumentError):
            validate_stream_id(bad)
    assert url_kind("rtsp://10.0.0.5:554/stream1") == "rtsp"
    assert url_kind("rtsps://cam.local/s") == "rtsp"
    assert url_kind("synthetic://belt?fps=5") == "synthetic"
    assert url_kind("/videos/line1.mp4", allow_files=True) == "file"
    with pytest.raises(InvalidArgumentError, match="--allow-files"):
        url_kind("/videos/line1.mp4")
    with pytest.raises(InvalidArgumentError, match=r"(?i)port out of range"):
        url_kind("rtsp://cam:99999/s")
    assert url_kind("RTSP://admin:pw@cam_1.plant-a.local:554/s") == url_kind("rtsp://[fe80::1]/s") == "rtsp"
    assert url_kind("rtsp://10.0.0.5/" + "a" * 2000) == "rtsp"
    with pytest.raises(InvalidArgumentError, match=r"url is 170025 characters long; the limit is 2048 \(it begins "
                       r"'rtsp://admin:\*\*\*@10.0.0.5/aaa"):  # a 17 MB one made ListStreams fail; no password shown
        url_kind("rtsp://admin:pw@10.0.0.5/" + "a" * 170_000)
    with pytest.raises(InvalidArgumentError, match=r"the host '10.0.0.1\\\\x' holds characters no host name has"):
        url_kind("rtsp://admin:pw@10.0.0.1\\x")  # a backslash for the path's slash: FFmpeg tried to resolve it
    assert redact_url("rtsp://admin:secret@10.0.0.5:554/s") == "rtsp://admin:***@10.0.0.5:554/s"


def test_the_helps_of_a_streams_file_name_every_key_it_takes(tmp_path, capsys):
    """`yolov12-serve --help` (--streams) and `yolov12-ctl apply --help` list a streams file's keys: all those the
    loader takes (a zone, track or class_min_scores set at start is found in the help), as its refusal of an
    unknown key lists them."""
    from yolov12_serve import ctl
    from yolov12_serve.cli import build_parser

    bad = tmp_path / "bad.yaml"
    bad.write_text("- {id: a, url: 'rtsp://h/a', fps: 3}\n")
    with pytest.raises(ConfigError, match=r"\(allowed: ([a-z_, ]+)\)") as refused:
        load_streams_file(bad)
    allowed = re.search(r"\(allowed: ([a-z_, ]+)\)", str(refused.value)).group(1)
    serve_help = " ".join(build_parser().format_help().split())
    assert f"'streams: [{{{allowed}}}]'" in serve_help
    with pytest.raises(SystemExit):
        ctl.main(["apply", "--help"])
    apply_help = " ".join(capsys.readouterr().out.split())
    assert f"YAML: streams: [{{{allowed}}}]" in apply_help


def test_streams_file(tmp_path):
    good = tmp_path / "cams.yaml"
    good.write_text("streams:\n  - id: a\n    url: rtsp://h/a\n    max_fps: 5\n    min_score: 0.6\n"
                    "    classes: [scratch, dent]\n    zone: [[0, 0.3], [1, 0.3], [1, 0.8], [0, 0.8]]\n"
                    "  - {id: b, url: 'synthetic://b', classes: crack, blind_after_s: 0, track: true,\n"
                    "     class_min_scores: {dent: 0.3, crack: 0.75}}\n")
    specs = load_streams_file(good)
    assert [(s.stream_id, s.url, s.max_fps, s.min_score) for s in specs] == [("a", "rtsp://h/a", 5.0, 0.6),
                                                                             ("b", "synthetic://b", 0.0, 0.0)]
    assert specs[0].classes == ("scratch", "dent") and specs[0].zone == ((0, 0.3), (1, 0.3), (1, 0.8), (0, 0.8))
    assert specs[1].classes == ("crack",) and specs[1].zone == () and specs[1].blind_after_s == 0
    assert specs[0].blind_after_s is None  # the server's --blind-after-s
    assert (specs[0].track, specs[1].track) == (False, True)
    assert (specs[0].class_min_scores, specs[1].class_min_scores) == ((), (("crack", 0.75), ("dent", 0.3)))
    for text, message in [("streams: 3", "expected 'streams:'"), ("streams:\n  - {id: a}", "'url'"),
                          ("- {id: a, url: x, fps: 3}", "unknown keys"), ("- {id: a, url: x}\n- {id: a, url: y}",
                                                                          "duplicate ids"),
                          ("- {id: '', url: x}", "empty"), ("streams: [", "not valid YAML"),
                          ("- {id: a, url: 'rtsp://h/a', min_score: 1.5}", "min_score must be 0..1"),
                          ("- {id: a, url: 'rtsp://h/a', min_score: high}", "min_score must be a number"),
                          ("- {id: a, url: 'rtsp://h/a', class_min_scores: {dent: 2}}", "the score of 'dent' must"),
                          ("- {id: a, url: 'rtsp://h/a', class_min_scores: [dent]}", "must map class names"),
                          ("- {id: a, url: 'rtsp://h/a', class_min_scores: {dent: x}}", "must map class names"),
                          ("- {id: a, url: 'rtsp://h/a', zone: [[0, 0], [1, 1]]}", "at least 3 points"),
                          ("- {id: a, url: 'rtsp://h/a', zone: [0, 0, 1, 0, 1, 1]}", r"list of \[x, y\] points"),
                          ("- {id: a, url: 'rtsp://h/a', zone: [[0, 0], [1, 0], [2, 1]]}", "outside the frame"),
                          ("- {id: a, url: 'rtsp://h/a', zone: [[0, 0], [.5, .5], [1, 1]]}", "encloses no area"),
                          ("- {id: a, url: 'rtsp://h/a', classes: {a: 1}}", "list of class names"),
                          ("- {id: a, url: 'rtsp://h/a', blind_after_s: -1}", "blind_after_s must be >= 0"),
                          ("- {id: a, url: 'rtsp://h/a', blind_after_s: soon}", "blind_after_s must be a number"),
                          ("- {id: a, url: 'rtsp://h/a', track: 'yes'}", "track must be true or false")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_streams_file(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_streams_file(tmp_path / "missing.yaml")


def test_serving_md_names_every_flag_with_its_default():
    """README and production.md send the reader to docs/serving.md for every flag (a contract kept across
    releases): each one of the parser is named there, and a default written beside a flag is the parser's."""
    from yolov12_serve.cli import DEFAULTS_WHEN_LEFT_OUT, build_parser

    doc = (ROOT / "docs" / "serving.md").read_text()
    actions = {o: a for a in build_parser()._actions for o in a.option_strings if o.startswith("--")}
    actions.pop("--help")
    assert not [o for o in actions if not re.search(rf"`{re.escape(o)}`", doc)]
    stated = re.findall(r"`(--[a-z-]+)` \(([0-9]+(?:\.[0-9]+)?)\)", doc)
    assert len(stated) > 20
    default = {o: DEFAULTS_WHEN_LEFT_OUT.get(o) if a.default is None else a.default for o, a in actions.items()}
    assert [(o, v, default[o]) for o, v in stated if float(v) != default[o]] == []


@pytest.mark.parametrize("script, argv, meant", [
    ("yolov12_serve.cli:main", ["--gpu", "none"], "--gpu: did you mean --gpus?"),
    ("yolov12_serve.cli:main", ["--stall", "-5"], "--stall: did you mean --stall-s?"),
    ("yolov12_serve.ctl:main", ["add", "c", "synthetic://x", "--max", "x"], "--max: did you mean --max-fps?"),
    ("yolov12_serve.predict.cli:main", ["--weight", "m.onnx", "--source", "x"], "--weight: did you mean --weights?"),
    ("trainer.cli:train_main", ["--epoch", "-1"], "--epoch: did you mean --epochs?"),
    ("trainer.cli:export_main", ["--weigths", "m.pt"], "--weigths: did you mean --weights?"),
    ("trainer.cli:val_main", ["--weights", "m.pt", "--dat", "d.yaml"], "--dat: did you mean --data?"),
])
def test_console_scripts_take_only_full_option_names(script, argv, meant, capsys):
    """argparse's default took any unambiguous prefix (`--gpu` for `--gpus`): a command line or manifest written
    so would change meaning or stop starting the day a flag sharing the prefix is added. Refused, one line, exit 2,
    naming the option meant."""
    import importlib

    module, name = script.split(":")
    main = getattr(importlib.import_module(module), name)
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and meant in err and err.count("\n") == 1, err


def test_gpus_option():
    assert parse_gpus(None, visible=[]) == ["cpu"]
    assert parse_gpus(None, visible=[0, 1]) == ["cuda:0", "cuda:1"]
    assert parse_gpus("cpu", visible=[0]) == ["cpu"]
    assert parse_gpus("0-3", visible=[0, 1, 2, 3]) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert parse_gpus("0,2", visible=[0, 1, 2]) == ["cuda:0", "cuda:2"]
    with pytest.raises(ConfigError, match="GPU 2,3 not present"):
        parse_gpus("0-3", visible=[0, 1])
    with pytest.raises(ConfigError, match="backwards"):
        parse_gpus("3-1", visible=[0, 1, 2, 3])
    assert parse_gpus("cpu:2", visible=[0]) == ["cpu:0", "cpu:1"]  # CPU devices that fail on their own, as GPUs
    for bad in ("cpu:0", "cpu:x", "cpu2"):
        with pytest.raises(ConfigError, match="cpu:N"):
            parse_gpus(bad, visible=[])
    from yolov12_serve.devices import engine_device, split_cpu_threads

    assert [engine_device(d) for d in ("cpu", "cpu:1", "cuda:1")] == ["cpu", "cpu", "cuda:1"]
    assert split_cpu_threads(["cpu:0", "cpu:1"], instances=2, cores=8) == 2  # the cores shared by all instances
    assert split_cpu_threads(["cpu:0", "cpu:1"], instances=2, cores=2) == 1
    assert split_cpu_threads(["cpu"], instances=2, cores=8) is None  # the backend's default


def test_without_gpus_an_onnx_engine_stays_on_the_cpu_where_onnx_runtime_has_no_cuda(monkeypatch):
    """`yolov12-serve --demo` (README: the embedded default, CPU) on a host with a GPU and the serving install's
    `onnxruntime` (no CUDA provider) ran the bundled .onnx on cuda:0 and stopped at start. Without --gpus, .onnx
    engines go to GPUs only where ONNX Runtime can run them there; --gpus and other engines are as asked."""
    import onnxruntime

    from yolov12_serve import devices
    from yolov12_serve.cli import build_parser, parse_config

    monkeypatch.setattr(devices, "visible_gpus", lambda: [0, 1])

    def config_devices(*argv: str) -> list[str]:
        return parse_config(build_parser().parse_args(["--no-state", *argv]))[0].devices

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert config_devices("--demo") == ["cpu"]
    assert config_devices("--engines", "m.onnx") == ["cpu"]
    assert config_devices("--engines", "m.engine") == ["cuda:0", "cuda:1"]  # TensorRT: GPUs only
    assert config_devices("--engines", "m.onnx", "--gpus", "0") == ["cuda:0"]  # asked for: the load error says why
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert config_devices("--demo") == ["cuda:0", "cuda:1"]


def test_stream_stats_keep_only_the_window():
    """Readers (the watchdog's placement refresh 4x a second, the status table) scan what they keep under the lock
    workers record with: it used to be the last 4096 results of every stream, now the last 5 s."""
    from yolov12_serve.stats import StreamStats

    st = StreamStats(window_s=5.0)
    for i in range(3000):  # 30 s at 100 results/s; the first 25 s slow
        st.record(0.5 if i < 2500 else 0.02, 1, t=i * 0.01)
    assert len(st._recent) <= 502
    snap = st.snapshot(t=29.995)
    assert snap.fps == pytest.approx(100, rel=0.02) and st.fps(t=29.995) == snap.fps
    assert snap.latency_p99_ms == pytest.approx(20.0) and snap.processed == 3000
    assert st.fps(t=40.0) == 0.0 and st.snapshot(t=40.0).latency_p50_ms == 0.0  # a stream gone quiet


def test_the_run_summary_takes_the_last_latencies_kept():
    """The end-of-run figures come from the last `history` latencies, kept in a float32 ring (80 KB a camera, not a
    deque of 20,000 float objects: 640 KB)."""
    from yolov12_serve.stats import StreamStats

    st = StreamStats(history=10)
    assert st.lifetime().latency_p99_ms == 0.0  # nothing yet
    for i in range(25):
        st.record(1.0 if i < 15 else 0.010 + i / 1000, 0, t=float(i))
    life = st.lifetime()
    assert life.processed == 25 and life.latency_p99_ms == pytest.approx(33.91, abs=0.01)  # of 25..34 ms only
    assert st._history.nbytes == 40


def test_frames_shed_without_the_lock_are_in_every_reader_s_figures():
    """A camera thread counts a shed frame without the stats lock (note_shed); whichever reader comes next takes
    it in: the snapshot's drops (ListStreams), the offered rate (placement), the exact counts (metrics)."""
    from yolov12_serve.stats import StreamStats

    def shedding(offered: int = 0, shed: int = 0) -> StreamStats:
        st = StreamStats(window_s=5.0)
        for i in range(offered):
            st.record_offered(i * 0.04)
        for _ in range(shed):
            st.note_shed()
        return st

    assert shedding(2, 3).snapshot(t=1.0).dropped_by_reason == {"superseded": 3}
    assert shedding(0, 4).snapshot(t=1.0).dropped == 4
    assert shedding(50, 0).offered_fps(t=2.0) == pytest.approx(25, rel=0.05)
    assert shedding(50, 50).offered_fps(t=2.0) > 45  # the 50 shed ones counted at the reader's time
    st = shedding(5, 7)
    assert st.counts() == (12, 7) and st.counts() == (12, 7)  # taken in once
    st.note_shed()
    st.record_offered(1.0)
    assert st.counts() == (14, 8) and st.lifetime().dropped == 8


def test_metric_series_looked_up_once_are_fresh_for_a_stream_added_again():
    """Per-frame series are kept once looked up; removing a stream must forget them, or a stream added again
    under the same id would count into series no scrape shows."""
    from yolov12_serve.metrics import Metrics

    m = Metrics(0.045, ["cpu"])
    for _ in range(2):
        m.add_stream("cam")
        m.dropped("cam", "late").inc()
        m.series("cam", "cpu").processed.inc()
        m.runs("cpu")[1].observe(1)
        text = m.exposition().decode()
        assert 'yolov12_frames_dropped_total{reason="late",stream="cam"} 1.0' in text
        assert 'yolov12_frames_processed_total{device="cpu",stream="cam"} 1.0' in text
        m.forget_stream("cam")
        assert 'stream="cam"' not in m.exposition().decode()
    assert 'yolov12_batch_size_count{device="cpu"} 2.0' in m.exposition().decode()



def test_until_its_saved_streams_are_back_a_starting_server_is_not_serving_and_says_retry(tmp_path):
    """Between loading its engines and adding its saved streams a restarting server is not SERVING, and over gRPC
    ListStreams (it would be short of them), AddStream (the id may be a saved one), RemoveStream and a watch naming
    an id it does not hold yet are UNAVAILABLE ("retry"), not NOT_FOUND: a watcher that came back first was told
    its camera was gone."""
    import asyncio

    from test_scheduler import CostEngine

    from yolov12_serve.api import create_server
    from yolov12_serve.client import Client, make_frame
    from yolov12_serve.config import ServerConfig, StreamSpec
    from yolov12_serve.core import ServerCore

    config = ServerConfig(engines=[str(ROOT / "pyproject.toml")], devices=["cpu"], metrics_port=-1,
                          allow_synthetic=True, state_dir=str(tmp_path), track_min_score=0.8)

    def load(path, device="cpu", instances=1, **opts):
        return CostEngine(a=0.002, b=0.001)

    before = ServerCore(config, load_engine=load)
    before.start()
    zone = ((0.0, 0.25), (1.0, 0.25), (1.0, 0.75), (0.0, 0.75))
    before.add_stream(StreamSpec("belt", "synthetic://belt?fps=5&size=320x180", min_score=0.4, classes=("part",),
                                 zone=zone, blind_after_s=120, track=True, class_min_scores={"part": 0.25}))
    before.drain(2)
    core = ServerCore(config, load_engine=load)
    health: list[bool] = []
    core.on_health_change = health.append
    core.start(hold=True)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server, port = asyncio.run_coroutine_threadsafe(create_server(core), loop).result(30)
    try:
        with Client(f"127.0.0.1:{port}") as c:
            pushed = make_frame(np.zeros((64, 64, 3), np.uint8))  # a viewer may push: not an id taken from a camera
            for call in (c.list_streams, lambda: c.remove_stream("belt"), lambda: next(iter(c.watch(["belt"]))),
                         lambda: c.add_stream("belt", "synthetic://belt?fps=5&size=320x180"),
                         lambda: next(iter(c.detect([pushed], stream_id="belt")))):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
                assert "still adding its saved streams; retry in a moment" in e.value.details()
            core._update_serving()  # what a device's health changing during the restore calls
            assert True not in health
            assert core.restore_streams() == 1
            core.opened()
            assert health[-1] is True and [(s.stream_id, round(s.min_score, 3), list(s.classes), list(s.zone),
                                            s.blind_after_s, s.track, dict(s.class_min_scores))
                                           for s in c.list_streams()] == [
                ("belt", 0.4, ["part"], [c for p in zone for c in p], 120, True, {"part": 0.25})]  # filters saved
            assert core._streams["belt"].tracker.new_track_score == 0.8  # --track-min-score
            c.remove_stream("belt")
            with pytest.raises(grpc.RpcError) as e:
                next(iter(c.watch(["belt"])))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        core.drain(2)


def test_a_pushed_frame_answered_before_its_hand_over_returns_is_still_answered_in_order():
    """A fast engine publishes a pushed frame's result before the executor's return reaches the call's reader: the
    call must count the frame first (it popped an empty deque: INTERNAL, the rest of the client's stream lost).
    The hand-over is made to linger after the frame is in, so the answer always comes first."""
    import asyncio

    from test_scheduler import CostEngine

    from yolov12_serve.api import create_server
    from yolov12_serve.client import Client
    from yolov12_serve.config import ServerConfig
    from yolov12_serve.core import ServerCore

    config = ServerConfig(engines=[str(ROOT / "pyproject.toml")], devices=["cpu"], metrics_port=-1)
    core = ServerCore(config, load_engine=lambda path, device="cpu", instances=1, **opts: CostEngine(a=0.001, b=0))
    hand_over = core.ingest_encoded

    def lingering(*args):
        frame = hand_over(*args)
        time.sleep(0.05)  # the frame is with the scheduler: its answer is published meanwhile
        return frame

    core.ingest_encoded = lingering
    core.start()
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server, port = asyncio.run_coroutine_threadsafe(create_server(core), loop).result(30)
    try:
        with Client(f"127.0.0.1:{port}") as c:
            frames = [np.full((48, 64, 3), i, np.uint8) for i in range(8)]
            assert [r.frame_id for r in c.detect(frames, stream_id="quick", timeout=30)] == list(range(8))
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        core.drain(2)


def test_a_saved_camera_is_restored_onto_a_device_out_of_service_not_dropped(tmp_path):
    """With its only device out of service when the saved streams come back, placement has nowhere healthy: the
    saved camera is placed there all the same and waits, as the cameras already there do. Refused (UNAVAILABLE),
    the restore dropped it from the saved set, and the operator's camera was forgotten."""
    from test_scheduler import CostEngine

    from yolov12_serve.config import ServerConfig, StreamSpec
    from yolov12_serve.core import ServerCore

    config = ServerConfig(engines=[str(ROOT / "pyproject.toml")], devices=["cpu"], metrics_port=-1,
                          allow_synthetic=True, state_dir=str(tmp_path))

    def load(path, device="cpu", instances=1, **opts):
        return CostEngine(a=0.002, b=0.001)

    before = ServerCore(config, load_engine=load)
    before.start()
    before.add_stream(StreamSpec("belt", "synthetic://belt?fps=5&size=320x180"))
    before.drain(2)
    core = ServerCore(config, load_engine=load)
    core.start(hold=True)
    try:
        core.placement.set_healthy("cpu", False)  # its engine failing since start
        assert core.restore_streams() == 1
        core.opened()
        assert [(s.stream_id, s.device) for s in core.list_streams()] == [("belt", "cpu")]
        assert [s.stream_id for s in ServerCore(config, load_engine=load).store.load()] == ["belt"]  # still saved
    finally:
        core.drain(2)


def test_a_camera_s_frames_and_superseded_drops_reach_metrics_at_each_scrape_exactly():
    """A camera's ingested and superseded frames are counted per frame only in its stats (two counter increments
    a tick were a fifth of its cost) and added to frames_total and frames_dropped_total{superseded} before each
    scrape: every scrape shows exactly what the stats hold, and scraping again adds nothing twice. Those of its
    frames shed under overload (never handed over: Stream.admit) are among them (three cameras, batches of one:
    only the camera next in turn hands over frames)."""
    from test_scheduler import CostEngine

    from yolov12_serve.config import ServerConfig, StreamSpec
    from yolov12_serve.core import ServerCore

    core = ServerCore(ServerConfig(engines=[str(ROOT / "pyproject.toml")], devices=["cpu"], metrics_port=-1,
                                   allow_synthetic=True, max_batch=1),
                      load_engine=lambda path, device="cpu", instances=1, **opts: CostEngine(a=0.2, b=0.0))
    core.start()
    try:
        for name in ("cam", "cam2", "cam3"):  # 150 frames/s offered, 10 run
            core.add_stream(StreamSpec(name, f"synthetic://{name}?fps=50&size=320x180"))
        streams = [core.get_stream(name) for name in ("cam", "cam2", "cam3")]
        stream = streams[0]

        def counted(text: str, name: str, **labels: str) -> float:
            want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            m = re.search(rf"^{name}\{{{want}\}} (\S+)$", text, re.M)
            return float(m.group(1)) if m else -1.0

        deadline = time.monotonic() + 20
        scheduler = core.runtimes["cpu"].scheduler
        while time.monotonic() < deadline and (stream.stats.counts()[1] < 10 or scheduler.stats().shed < 5):
            time.sleep(0.1)
        assert scheduler.stats().shed >= 5  # 15x overloaded: the cameras shed frames
        for s in streams:
            s.source.stop()  # nothing more comes: what the stats hold is final
        time.sleep(0.3)
        offered, superseded = stream.stats.counts()
        # handed over (numbered) or shed
        assert sum(s.stats.counts()[0] for s in streams) == sum(next(s._ids) for s in streams) + scheduler.stats().shed
        for _ in range(2):
            text = core.metrics.exposition().decode()
            assert counted(text, "yolov12_frames_total", stream="cam") == offered > 10
            assert counted(text, "yolov12_frames_dropped_total", reason="superseded", stream="cam") == superseded >= 10
    finally:
        core.drain(2)

def test_status_table_flags_p99_over_the_slo():
    from yolov12_serve.sources.base import StreamState
    from yolov12_serve.status import render_table
    from yolov12_serve.stream import StreamView

    view = StreamView("cam", "rtsp://h/s", "rtsp", StreamState.STREAMING, "cpu", 25.0, "", 100, 3, 0, 20.0, 60.0,
                      1.5, 640, 360)
    table = render_table([view], slo_ms=45)
    assert "cam" in table and "STREAMING" in table and "60.0!" in table
    capped = dataclasses.replace(view, picture_problem="blank")  # frames come, the picture shows nothing
    assert "BLANK" in render_table([capped], slo_ms=45) and "STREAMING" not in render_table([capped], slo_ms=45)
    header, line = table.splitlines()[1:3]
    column = header.index("objects") + len("objects")
    assert line[:column].endswith(" -")  # not tracked
    tracked = render_table([dataclasses.replace(view, track=True, objects=37)], slo_ms=45).splitlines()[2]
    assert tracked[:column].endswith(" 37"), tracked


def test_warm_up_times_no_instance_s_first_run_of_a_shape():
    """Each instance's first run of a shape is slow (allocations; a CUDA graph capture on GPUs): the warm-up runs
    it on every instance before it times one, so the cost model starts from steady-state run times."""
    from engines.pool import InstancePool
    from yolov12_serve.costmodel import RunTimeModel
    from yolov12_serve.preprocess import InputPlanner
    from yolov12_serve.runtime import warm_up

    class FirstRunSlowEngine(Engine):
        def __init__(self, instances: int) -> None:
            self.info = EngineInfo(names={0: "part"}, imgsz=(320, 320), stride=32, batch=(1, 8), dynamic_hw=True)
            self.device, self.instances = "cpu", instances
            self._pool = InstancePool([set() for _ in range(instances)])  # the shapes each instance has run

        def infer(self, batch: np.ndarray) -> list[np.ndarray]:
            with self._pool.borrow() as seen:
                first = batch.shape not in seen
                seen.add(batch.shape)
                time.sleep(0.2 if first else 0.002)
            return [np.zeros((0, 6), np.float32) for _ in batch]

    engine = FirstRunSlowEngine(instances=2)
    planner = InputPlanner(engine.info.imgsz, engine.info.stride, engine.info.dynamic_hw)
    cost = RunTimeModel()
    full = warm_up(engine, planner, cost, max_batch=4, instances=2)
    assert full < 0.1
    assert cost.predict(1, (192, 320), 0.5) < 0.1
    assert cost.predict(4, (192, 320), 0.5, others=1) < 0.1


def test_an_engine_that_keeps_failing_hands_its_streams_to_a_healthy_device():
    """Two devices (deterministic engines); cuda:1's engine starts failing: its streams move to cuda:0 and keep
    producing results; when the last device fails too, health goes NOT_SERVING."""
    from test_scheduler import CostEngine

    from yolov12_serve.config import ServerConfig, StreamSpec
    from yolov12_serve.core import ServerCore

    made: dict[str, CostEngine] = {}

    def load(path, device="cpu", instances=1, **opts):
        made[device] = CostEngine(a=0.002, b=0.001)
        return made[device]

    health: list[bool] = []
    devices: list[tuple[str, bool]] = []
    core = ServerCore(ServerConfig(engines=[str(ROOT / "pyproject.toml")], devices=["cuda:0", "cuda:1"],
                                   metrics_port=-1, recheck_s=0.2, allow_synthetic=True), load_engine=load)
    core.on_health_change = health.append
    core.on_device_health = lambda device, ok: devices.append((device, ok))
    core.start()
    try:
        for i in range(4):
            core.add_stream(StreamSpec(f"s{i}", f"synthetic://s{i}?fps=20&size=320x180"))
        assert sorted(v.device for v in core.list_streams()) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
        sub = core.fanout.subscribe(None, 1000)
        made["cuda:1"].fail = True
        wait = time.monotonic() + 20
        while time.monotonic() < wait and any(v.device == "cuda:1" for v in core.list_streams()):
            time.sleep(0.05)
        assert all(v.device == "cuda:0" for v in core.list_streams())
        time.sleep(0.5)
        while sub.get(0) is not None:  # forget what was published before the move
            pass
        served: dict[str, set[str]] = {}
        wait = time.monotonic() + 20
        while time.monotonic() < wait and len(served) < 4:  # every stream is answered again, by cuda:0
            r = sub.get(0.1)
            if r is not None and r.error is None:
                served.setdefault(r.stream_id, set()).add(r.device)
        assert served == {f"s{i}": {"cuda:0"} for i in range(4)}
        made["cuda:0"].fail = True
        wait = time.monotonic() + 20
        while time.monotonic() < wait and False not in health:
            time.sleep(0.05)
        assert health[0] is True and health[-1] is False
        assert ("cuda:1", False) in devices and devices[-1] == ("cuda:0", False)
        made["cuda:0"].fail = made["cuda:1"].fail = False  # the re-checks (every 0.2 s) find both working again
        wait = time.monotonic() + 20
        while time.monotonic() < wait and len(core.placement.healthy_devices()) < 2:
            time.sleep(0.05)
        assert health[-1] is True and sorted(core.placement.healthy_devices()) == ["cuda:0", "cuda:1"]
    finally:
        core.drain(2)


def test_two_devices_failing_at_once_hand_every_stream_to_the_healthy_one():
    """cuda:1 and cuda:2 fail at the same moment: failover is serialised and each reads the others' own health,
    so no stream is moved onto a device failing too (they picked each other); every failed batch is counted,
    and the streams show the engine's error until results come again."""
    from test_scheduler import CostEngine

    from yolov12_serve.config import ServerConfig, StreamSpec
    from yolov12_serve.core import ServerCore

    made: dict[str, CostEngine] = {}

    def load(path, device="cpu", instances=1, **opts):
        made[device] = CostEngine(a=0.002, b=0.001)
        return made[device]

    core = ServerCore(ServerConfig(engines=[str(ROOT / "pyproject.toml")], devices=["cuda:0", "cuda:1", "cuda:2"],
                                   allow_synthetic=True,
                                   metrics_port=-1, recheck_s=60), load_engine=load)
    core.start()
    try:
        for i in range(6):
            core.add_stream(StreamSpec(f"s{i}", f"synthetic://s{i}?fps=20&size=320x180"))
        assert sorted(v.device for v in core.list_streams()) == ["cuda:0"] * 2 + ["cuda:1"] * 2 + ["cuda:2"] * 2
        made["cuda:1"].fail = made["cuda:2"].fail = True
        wait = time.monotonic() + 30
        while time.monotonic() < wait and any(v.device != "cuda:0" for v in core.list_streams()):
            time.sleep(0.05)
        assert all(v.device == "cuda:0" for v in core.list_streams())
        assert sorted(core.placement.healthy_devices()) == ["cuda:0"]
        text = core.metrics.exposition().decode()
        for device in ("cuda:1", "cuda:2"):
            m = re.search(rf'yolov12_engine_failures_total{{device="{device}"}} (\S+)', text)
            assert m and float(m.group(1)) >= 3, text  # each failed batch, not each streak
        moved = [v for v in core.list_streams() if "device lost" in v.last_error]
        assert len(moved) >= 4
        sub = core.fanout.subscribe(None, 1000)
        served: set[str] = set()
        wait = time.monotonic() + 20
        while time.monotonic() < wait and len(served) < 6:
            r = sub.get(0.1)
            if r is not None and r.error is None:
                assert r.device == "cuda:0"
                served.add(r.stream_id)
        assert served == {f"s{i}" for i in range(6)}
    finally:
        core.drain(2)


def test_the_stream_store_keeps_the_set_whole_and_passwords_apart(tmp_path):
    """Saved and loaded back as given; the list holds no password, the credentials file (0600) does; of two saves
    at once the later state is the one written (the snapshot is taken under the store's lock); a broken file is
    one clear error."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    from yolov12_serve.config import StreamSpec
    from yolov12_serve.state import StreamStore

    store = StreamStore(tmp_path / "state")
    store.open()
    assert store.load() == []
    specs = [StreamSpec("a", "rtsp://cam/a", 5.0), StreamSpec("b", "rtsp://op:s3cret@cam/b", 0.0)]
    store.save(lambda: specs)
    assert StreamStore(tmp_path / "state").load() == specs
    assert "s3cret" not in store.streams_path.read_text() and "op:***@cam/b" in store.streams_path.read_text()
    assert json.loads(store.credentials_path.read_text())["urls"] == {"b": "rtsp://op:s3cret@cam/b"}
    assert (store.credentials_path.stat().st_mode & 0o777) == 0o600
    current: list[StreamSpec] = []
    lock = threading.Lock()

    def add_and_save(i: int) -> None:
        with lock:
            current.append(StreamSpec(f"s{i}", f"rtsp://u:p{i}@cam/{i}"))
        store.save(lambda: list(current))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(add_and_save, range(40)))
    assert {s.stream_id for s in StreamStore(tmp_path / "state").load()} == {f"s{i}" for i in range(40)}
    assert not [p for p in store.folder.iterdir() if p.name.endswith(".tmp")]
    store.save(lambda: [])  # every stream removed: its credentials go too
    assert json.loads(store.credentials_path.read_text())["urls"] == {} and store.load() == []
    store.save(lambda: [StreamSpec("f32", "rtsp://cam/f", float(np.float32(12.5)), float(np.float32(0.4)),
                                    zone=((float(np.float32(0.1)), 0.0), (1.0, 0.0), (1.0, 1.0)))])
    (saved,) = json.loads(store.streams_path.read_text())["streams"]
    assert (saved["min_score"], saved["zone"][0]) == (0.4, [0.1, 0.0])  # as the client meant it, not 0.40000000596
    # a broken file is set aside, not a server that refuses to start (its command-line cameras blind with it)
    doc = json.loads(store.streams_path.read_text())
    doc["streams"] += [{"id": "no-url"}, {"id": "zone", "url": "rtsp://cam/z", "zone": [[1, 2, 3]]}]
    store.streams_path.write_text(json.dumps(doc))
    assert [s.stream_id for s in StreamStore(tmp_path / "state").load()] == ["f32"]  # malformed entries left out
    store.streams_path.write_text("{not json")
    assert store.load() == [] and not store.streams_path.exists()
    (kept,) = store.folder.glob("streams.json.unreadable-*")
    assert kept.read_text() == "{not json"


def test_a_low_open_files_limit_is_raised_to_what_the_limits_need_or_said_at_start():
    """60 cameras and 300 watchers under `ulimit -n 256` hit the limit: cameras fail with 'Too many open files' and
    new gRPC calls wait. At start the soft limit is raised as far as the hard one allows, and a warning says when
    that is still short of what --max-streams and --max-concurrent-rpcs need."""
    import resource

    from yolov12_serve.app import ensure_descriptors
    from yolov12_serve.config import ServerConfig

    config = ServerConfig(engines=["x.onnx"], devices=["cpu"], max_streams=64, max_concurrent_rpcs=256)
    need = 64 + 4 * 64 + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"the hard open-files limit here ({hard}) is below {need}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        assert ensure_descriptors(config) == need == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    script = ("import logging, sys; logging.basicConfig(); from yolov12_serve.app import ensure_descriptors; "
              "from yolov12_serve.config import ServerConfig; "
              "sys.exit(ensure_descriptors(ServerConfig(engines=['x.onnx'], devices=['cpu'])) != 256)")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
    assert run.returncode == 0, run.stderr
    assert ("open files are limited to 256 (ulimit -n, systemd LimitNOFILE, docker --ulimit nofile) but --max-streams "
            f"64 and --max-concurrent-rpcs 256 may need about {need}") in run.stderr, run.stderr
