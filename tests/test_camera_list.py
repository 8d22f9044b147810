"""SIGHUP applies the command line's camera list again (camera_list.py): the real server with a streams file,
edited while it runs; and a camera whose password was changed, taken from its rewritten credentials file."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest
from test_rtsp import RtspServer, _gstreamer_ok, free_port, start_cameras, stop_cameras, wait_state
from test_server_harness import ServerProcess, model_path, wait_until

from yolov12_serve.proto import detector_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _write(path: Path, entries: list[str]) -> None:
    path.write_text("streams:\n" + "".join(f"  - {e}\n" for e in entries))


def _applied(srv: ServerProcess, count: int) -> str:
    """The log line of the `count`-th camera list applied by SIGHUP."""
    def line():
        found = [x for x in srv.log().splitlines() if "SIGHUP: camera list applied" in x]
        return found[count - 1] if len(found) >= count else None

    return wait_until(line, 30, what=f"camera list applied {count} time(s)")


@pytest.mark.parametrize("gpus", ["cpu", "cpu:2"])
def test_sighup_makes_the_running_cameras_those_of_the_edited_list(tmp_path, gpus):
    """Taken out: removed; changed: replaced; new: added; unchanged: left running (its frames go on counting); an id
    held by a camera added over gRPC: that camera is kept. A list that cannot be read changes nothing. In one
    process and with a process per device (cameras decoded there)."""
    listed = tmp_path / "cameras.yaml"
    _write(listed, ["{id: a, url: 'synthetic://a?fps=5&size=160x90'}",
                    "{id: b, url: 'synthetic://b?fps=5&size=160x90'}",
                    "{id: c, url: 'synthetic://c?fps=5&size=160x90', max_fps: 5}"])
    srv = ServerProcess("--streams", str(listed), "--allow-synthetic", "--gpus", gpus)
    try:
        c = srv.client()
        c.wait_ready(30)
        c.add_stream("mine", "synthetic://m?fps=5&size=160x90")  # over gRPC: not the list's
        wait_until(lambda: (s := c.stream("b")) is not None and s.frames_processed > 5, 30, what="b streaming")
        b_before = c.stream("b").frames_processed
        _write(listed, ["{id: b, url: 'synthetic://b?fps=5&size=160x90'}",
                        "{id: c, url: 'synthetic://c?fps=5&size=160x90', max_fps: 2}",
                        "{id: d, url: 'synthetic://d?fps=5&size=160x90'}",
                        "{id: mine, url: 'synthetic://other?fps=5&size=160x90'}"])
        srv.proc.send_signal(signal.SIGHUP)
        line = _applied(srv, 1)
        assert "d added; c changed; a removed; mine refused; 1 unchanged" in line, line
        streams = {s.stream_id: s for s in c.list_streams()}
        assert set(streams) == {"b", "c", "d", "mine"}
        assert streams["c"].max_fps == pytest.approx(2.0)
        assert streams["mine"].url == "synthetic://m?fps=5&size=160x90"  # the gRPC one, untouched
        assert streams["b"].frames_processed >= b_before  # the same camera, not a new one counting from 0
        assert "a stream added over gRPC has its id" in srv.log()

        listed.write_text("streams: [{id: b, url: }")  # broken: nothing changes
        srv.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "the camera list was not applied" in srv.log(), 30, what="the refusal")
        assert {s.stream_id for s in c.list_streams()} == {"b", "c", "d", "mine"}

        c.remove_stream("d")  # over gRPC: the list still holds it, and says so
        assert "stream d removed; it is in the camera list the server started with" in srv.log()
        assert "stream a removed; it is" not in srv.log()  # (removed by the list itself)
        b_before = c.stream("b").frames_processed
        _write(listed, ["{id: b, url: 'synthetic://b?fps=5&size=160x90', classes: [no-such-class]}"])
        srv.proc.send_signal(signal.SIGHUP)
        assert "c removed; b refused; 0 unchanged" in _applied(srv, 2)  # checked before b was touched
        assert "unknown classes ['no-such-class'] for stream b" in srv.log()
        assert {s.stream_id for s in c.list_streams()} == {"b", "mine"}
        b = c.stream("b")
        assert not b.classes and b.frames_processed >= b_before  # still the running camera
        c.close()
    finally:
        srv.close()


def test_a_sighup_while_the_engines_load_applies_the_list_once_the_server_has_started(tmp_path):
    """SIGHUP while the engines warm up (slowed by a fault switch): the list read then is applied after the start has
    added the cameras it read itself; applied at once, its cameras were refused ("still loading") and lost. The
    engine file rewritten meanwhile is loaded again after the start too: it was refused ("still loading") and the
    server went on with what it had read, whichever that was."""
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "delay-cpu").write_text("0.2")  # seconds a frame: the warm-up takes several seconds
    served = tmp_path / "model.onnx"
    shutil.copy(model_path(), served)
    listed = tmp_path / "cameras.yaml"
    _write(listed, ["{id: a, url: 'synthetic://a?fps=2&size=160x90'}"])
    srv = ServerProcess("--streams", str(listed), "--allow-synthetic", model=served, faults=faults, wait=False)
    try:
        wait_until(lambda: "loading the engines" in srv.log(), 60, what="the engines loading")
        _write(listed, ["{id: a, url: 'synthetic://a?fps=2&size=160x90'}", "{id: b, url: 'synthetic://b?fps=2'}"])
        time.sleep(0.3)  # the start has taken the file's signature (at once) and is warming it up (seconds)
        shutil.copy(model_path(), served)  # rewritten on disk while it loads: a new model copied in
        srv.proc.send_signal(signal.SIGHUP)
        srv.wait_started()
        (faults / "delay-cpu").unlink()  # the reload's warm-up at full speed
        assert "b added; 1 unchanged" in _applied(srv, 1)
        log = srv.log()
        assert "engine reload refused" not in log and "cpu: now serving" in log, log[-3000:]
        c = srv.client()
        c.wait_ready(30)
        assert sorted(s.stream_id for s in c.list_streams()) == ["a", "b"]
        c.close()
    finally:
        srv.close()


@pytest.mark.skipif(not _gstreamer_ok(), reason="GStreamer RTSP server (python3-gi, gir1.2-gst-rtsp-server-1.0) "
                    "not installed: scripts/setup test installs it")
def test_a_changed_camera_password_is_taken_from_its_credentials_file_at_sighup(tmp_path):
    """The camera's password was changed: it answers 401 and the camera keeps RECONNECTING. The operator writes the
    new password into the camera's credentials file and sends SIGHUP: the camera streams again. (ListStreams masks
    the password, so `yolov12-ctl apply` cannot see this change; the server compares the URLs in full.)"""
    cameras = start_cameras(tmp_path)  # frames for the mounts, written once
    stop_cameras(cameras)
    camera = RtspServer(free_port(), cameras.mounts, "--auth", "inspector:n3w-pass")
    camera.start()
    secret = tmp_path / "cam0.credentials"
    secret.write_text("inspector:old-pass\n")
    listed = tmp_path / "cameras.yaml"
    _write(listed, [f"{{id: cam0, url: '{camera.url('cam0')}', credentials: {secret}}}"])
    srv = ServerProcess("--streams", str(listed), "--stall-s", "1.5", "--backoff-cap-s", "1")
    try:
        c = srv.client()
        c.wait_ready(30)
        refused = wait_state(c, "cam0", pb.STREAM_STATE_RECONNECTING)
        wait_until(lambda: "401" in c.stream("cam0").last_error, 20, what="401 in last_error")
        assert "old-pass" not in srv.log() and "old-pass" not in c.stream("cam0").url
        secret.write_text("inspector:n3w-pass\n")
        srv.proc.send_signal(signal.SIGHUP)
        assert "cam0 changed" in _applied(srv, 1)
        wait_state(c, "cam0", pb.STREAM_STATE_STREAMING, timeout=30)
        assert refused.url == c.stream("cam0").url  # masked alike: only the server saw the change
        assert "n3w-pass" not in srv.log()
        c.close()
    finally:
        srv.close()
        camera.kill()


def test_the_list_never_removes_a_camera_added_over_grpc_since_it_was_read(tmp_path):
    """The list's removals check, under the registry's lock, that the camera is still the list's: one removed and
    added again over gRPC between the list's snapshot and its removal is left running (it was removed: the
    operator's camera gone at a certificate-rotation SIGHUP). The core in-process, its snapshot taken stale."""
    from test_scheduler import CostEngine
    from test_server_harness import ROOT

    from yolov12_serve.camera_list import apply_camera_list
    from yolov12_serve.config import ServerConfig, StreamSpec
    from yolov12_serve.core import ServerCore

    config = ServerConfig(engines=[str(ROOT / "pyproject.toml")], devices=["cpu"], metrics_port=-1,
                          allow_synthetic=True, state_dir=str(tmp_path))
    core = ServerCore(config, load_engine=lambda path, device="cpu", instances=1, **opts: CostEngine(a=0.001, b=0))
    core.start()
    try:
        core.opened()
        listed = StreamSpec("x", "synthetic://x?fps=2&size=160x90")
        core.add_stream(listed, persist=False, listed=True)
        stale = core.listed_specs()  # the list's snapshot, taken before the operator's change
        core.remove_stream("x")
        core.add_stream(StreamSpec("x", "synthetic://other?fps=2&size=160x90"))  # over gRPC: kept in the state
        core.listed_specs = lambda: stale
        change = apply_camera_list(core, [])  # the file no longer lists x
        assert change.removed == [] and [s.url for s in core.list_streams()] == ["synthetic://other?fps=2&size=160x90"]
    finally:
        core.drain(2)


def test_demo_cameras_come_only_without_a_list_not_when_the_list_is_emptied(tmp_path):
    """--demo with --streams: the list's cameras; emptied and read again (as SIGHUP does), no camera at all, not
    the four demo cameras in place of the plant's."""
    from yolov12_serve.cli import build_parser, listed_streams, parse_config

    listed = tmp_path / "cameras.yaml"
    _write(listed, ["{id: line1, url: 'synthetic://?size=64x48&fps=5'}"])
    args = build_parser().parse_args(["--demo", "--streams", str(listed)])
    config, streams = parse_config(args)
    assert [s.stream_id for s in streams] == ["line1"]
    listed.write_text("streams: []\n")
    assert listed_streams(args, config, quiet=True) == []
    demo = build_parser().parse_args(["--demo"])
    assert len(parse_config(demo)[1]) == 4
