"""`yolov12-ctl` against the real server over its socket: cameras added, listed, watched and removed from a shell,
images detected as the Python client sees them, and every refusal one line with its status and exit code."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from certs import HAVE_OPENSSL, make_ca, make_cert
from test_server_harness import ROOT, ServerProcess, wait_until

from yolov12_serve import ctl
from yolov12_serve.proto import detector_pb2 as pb

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server():
    # --process-late: `detect` compares answers; on a busy machine an image may miss the SLO and be refused as late
    srv = ServerProcess("--max-streams", "4", "--instances", "1", "--allow-synthetic", "--no-status", "--process-late")
    srv.client().wait_ready(60)
    yield srv
    srv.close()


def run(*argv: str) -> tuple[int, str]:
    """Exit status and standard output of one `yolov12-ctl` command, run in this process."""
    out = io.StringIO()
    try:
        return ctl.main(list(argv), out=out), out.getvalue()
    except SystemExit as e:  # a command line argparse refuses
        return int(e.code or 0), out.getvalue()


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def column(table: str, name: str) -> list[str]:
    """One column of a printed table, row by row (the header names where it starts)."""
    header, *rows = table.splitlines()
    start = header.index(name)
    return [row[start:].split()[0] for row in rows]


def test_a_camera_added_listed_watched_and_removed_from_the_shell(server):
    at = ("--server", server.address)
    rc, out = run(*at, "add", "dock-cam", "synthetic://dock?fps=10&size=320x180")
    assert rc == 0 and out.splitlines()[0].split()[:3] == ["STREAM", "STATE", "DEVICE"]
    assert out.splitlines()[1].split()[:3] == ["dock-cam", "CONNECTING", "cpu"]

    def listed() -> dict:
        (stream,) = json_lines(run(*at, "streams", "--json")[1])
        return stream if stream["frames_processed"] != "0" else {}

    stream = wait_until(listed, 30, what="a processed frame")
    assert (stream["stream_id"], stream["state"], stream["device"], stream["width"]) == ("dock-cam", "STREAMING",
                                                                                         "cpu", 320)
    assert column(run(*at, "streams")[1], "OBJECTS") == ["-"]  # not tracked

    rc, out = run(*at, "watch", "dock-cam", "--count", "3", "--json")  # --json after the command reads as meant
    results = json_lines(out)
    assert rc == 0 and len(results) == 3 and {r["stream_id"] for r in results} == {"dock-cam"}
    ids = [int(r["frame_id"]) for r in results]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert (results[0]["width"], results[0]["height"]) == (320, 180)
    rc, out = run(*at, "watch", "--count", "2")  # every camera, as text
    assert rc == 0 and all(line.startswith("dock-cam #") and " ms: " in line for line in out.splitlines())
    rc, out = run(*at, "watch", "--duration", "1")  # its end is no error
    assert rc == 0 and 3 <= len(out.splitlines()) <= 12

    rc, out = run(*at, "remove", "dock-cam", "--json")
    assert rc == 0 and json_lines(out)[0]["state"] == "STOPPED"
    assert run(*at, "streams") == (0, "no streams (add one: yolov12-ctl add ID URL)\n")


def test_watch_objects_prints_each_tracked_part_once(server, capsys):
    """watch --objects: a line per object (its first frame with a track id), what an MES recording each defect once
    gets; --count counts objects; an object never comes twice. On a camera that does not track it would wait for
    ever: one line saying so, exit 2."""
    at = ("--server", server.address)
    try:
        assert run(*at, "add", "plain", "synthetic://plain?fps=2&size=320x180")[0] == 0
        rc, _ = run(*at, "watch", "plain", "--objects", "--duration", "30")
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "this camera does not track objects" in err, err
        assert run(*at, "add", "parts", "synthetic://parts?fps=10&size=640x360&seed=2", "--track")[0] == 0
        rc, out = run(*at, "watch", "parts", "--objects", "--count", "2", "--json", "--duration", "60")
        first, second = json_lines(out)
        assert rc == 0 and first["stream_id"] == "parts" and int(first["track_id"]) >= 1
        assert first["track_id"] != second["track_id"] and first["time"].endswith("Z") and "x1" in first
        rc, out = run(*at, "watch", "parts", "--objects", "--count", "1", "--duration", "60")
        assert rc == 0 and re.fullmatch(r"parts \[\d+\] \S+ 0\.\d\d \(\d+,\d+,\d+,\d+\) #\d+ at \S+Z\n", out), out
    finally:
        run(*at, "remove", "parts", "plain")


def test_remove_takes_several_ids_and_goes_on_past_one_it_cannot_remove(server, capsys):
    at = ("--server", server.address)
    for sid in ("r1", "r2"):
        rc, out = run(*at, "add", sid, f"synthetic://{sid}?fps=2&size=320x180", "--min-score", "0.3", "--json",
                      "--classes", "dent, crack", "--zone", "0,.5,1,.5,1,1", "--blind-after-s", "0", "--track",
                      "--class-min-score", "dent=0.6", "--class-min-score", "crack=0.2")
        (info,) = json_lines(out)
        assert rc == 0 and info["min_score"] == pytest.approx(0.3) and info["classes"] == ["dent", "crack"]
        assert info["class_min_scores"] == pytest.approx({"dent": 0.6, "crack": 0.2})
        assert info["zone"] == pytest.approx([0, 0.5, 1, 0.5, 1, 1]) and info["blind_after_s"] == 0
        assert info["track"] is True
    assert all(n.isdigit() for n in column(run(*at, "streams")[1], "OBJECTS"))  # tracked: a count, not '-'
    rc, out = run(*at, "remove", "r1", "nope", "r2", "--json")
    err = capsys.readouterr().err
    assert rc == 1 and [r["stream_id"] for r in json_lines(out)] == ["r1", "r2"]
    assert err.startswith("yolov12-ctl: remove nope: NOT_FOUND: no stream 'nope'") and err.count("\n") == 1, err
    assert run(*at, "streams")[1].startswith("no streams")


def test_apply_makes_the_cameras_those_of_a_streams_file(server, tmp_path, capsys):
    """A plant's camera list in a file, applied to a running server (no restart): a dry run changes nothing;
    then the missing camera is added, the one whose max_fps changed replaced, the unchanged one left running,
    one the file does not list kept (removed with --prune, which also frees room for the one refused before:
    --max-streams 4); applying again changes nothing. A refused camera is a line on stderr and exit 1."""
    at = ("--server", server.address)
    with server.client() as c:
        c.add_stream("old", "synthetic://old?fps=2&size=320x180")
        c.add_stream("keep", "synthetic://keep?fps=2&size=320x180", max_fps=1)
        c.add_stream("tune", "synthetic://tune?fps=2&size=320x180")
        running = {s.stream_id: s.url for s in c.list_streams()}
        cameras = tmp_path / "cameras.yaml"
        cameras.write_text("streams:\n"
                           "  - {id: keep, url: 'synthetic://keep?fps=2&size=320x180', max_fps: 1}\n"
                           "  - {id: tune, url: 'synthetic://tune?fps=2&size=320x180', max_fps: 1}\n"
                           "  - {id: new, url: 'synthetic://new?fps=2&size=320x180'}\n"
                           "  - {id: late, url: 'synthetic://late?fps=2&size=320x180'}\n")

        def plan(*extra: str) -> tuple[int, dict[str, tuple[str, str]], str]:
            rc, out = run(*at, "apply", str(cameras), "--json", *extra)
            return rc, {r["stream_id"]: (r["action"], r["result"]) for r in json_lines(out)}, capsys.readouterr().err

        rc, steps, _ = plan("--dry-run")
        assert rc == 0 and steps == {"old": ("unlisted", "kept (--prune removes it)"), "keep": ("keep", ""),
                                     "tune": ("replace", "dry run"), "new": ("add", "dry run"),
                                     "late": ("add", "dry run")}
        assert {s.stream_id: s.url for s in c.list_streams()} == running
        rc, steps, err = plan()
        assert rc == 1 and steps["late"] == ("add", "failed: RESOURCE_EXHAUSTED"), steps
        assert err.startswith("yolov12-ctl: add late: RESOURCE_EXHAUSTED: stream limit reached") and err.count(
            "\n") == 1, err
        listed = {s.stream_id: s for s in c.list_streams()}
        assert sorted(listed) == ["keep", "new", "old", "tune"] and listed["tune"].max_fps == 1
        rc, out = run(*at, "apply", str(cameras), "--prune")
        assert rc == 0 and out.splitlines()[-1] == "1 added, 0 replaced, 1 removed, 3 unchanged, 0 not in the file"
        assert sorted(s.stream_id for s in c.list_streams()) == ["keep", "late", "new", "tune"]
        assert plan("--prune")[:2] == (0, {sid: ("keep", "") for sid in ("keep", "late", "new", "tune")})
        # --replace: a camera that looks unchanged (a new password is masked in ListStreams) replaced all the same
        rc, steps, _ = plan("--replace", "keep")
        assert rc == 0 and steps["keep"] == ("replace", "done") and steps["new"] == ("keep", ""), steps
        assert run(*at, "apply", str(cameras), "--replace", "nosuch") == (2, "")
        assert capsys.readouterr().err == f"yolov12-ctl: --replace nosuch: not in {cameras} (nothing changed)\n"
        rc, _ = run(*at, "apply", str(tmp_path / "missing.yaml"))
        assert rc == 2 and capsys.readouterr().err.startswith("yolov12-ctl: cannot read streams file")
        ftp = tmp_path / "ftp.yaml"  # a URL no server takes: refused before anything changes, in a dry run too
        ftp.write_text("streams:\n  - {id: keep, url: 'synthetic://keep?fps=2&size=320x180', max_fps: 1}\n"
                       "  - {id: odd, url: 'ftp://cam/x'}\n")
        for extra in ("--dry-run", "--prune"):
            assert run(*at, "apply", str(ftp), extra) == (2, "")
            assert capsys.readouterr().err.startswith(f"yolov12-ctl: {ftp}: stream odd: unsupported url 'ftp://cam/x'")
        assert sorted(s.stream_id for s in c.list_streams()) == ["keep", "late", "new", "tune"]
        cameras.write_text(cameras.read_text().replace("synthetic://tune?fps=2&size=320x180", "/clips/tune.mp4"))
        rc, steps, err = plan()  # a file camera on a server without --allow-files: the running one is added back
        assert rc == 1 and steps["tune"] == ("replace", "failed: INVALID_ARGUMENT (the running one added back)")
        assert err.startswith("yolov12-ctl: replace tune (the running one added back): INVALID_ARGUMENT"), err
        tune = {s.stream_id: s for s in c.list_streams()}["tune"]
        assert tune.url == "synthetic://tune?fps=2&size=320x180" and tune.max_fps == 1  # as it ran
        for sid in ("keep", "late", "new", "tune"):
            c.remove_stream(sid)


def test_apply_refuses_a_class_the_model_lacks_before_it_removes_the_running_camera(server, tmp_path, capsys):
    """A typo in a class name of an edited streams file (classes or class_min_scores) is refused before anything
    changes, in a dry run too: the server would refuse the replacement only after `apply` had removed the camera
    running now, taking a working camera off the line."""
    at = ("--server", server.address)
    with server.client() as c:
        c.add_stream("belt", "synthetic://belt?fps=2&size=320x180", classes=["dent"])
        try:
            for typo in ("classes: [dent, bolt]", "class_min_scores: {dent: 0.3, bolt: 0.6}"):
                cameras = tmp_path / "cameras.yaml"
                cameras.write_text("streams:\n  - id: belt\n    url: 'synthetic://belt?fps=2&size=320x180'\n"
                                   f"    {typo}\n")
                for extra in ("--dry-run", "--prune"):
                    assert run(*at, "apply", str(cameras), extra) == (2, "")
                    err = capsys.readouterr().err
                    assert err.startswith(f"yolov12-ctl: {cameras}: stream belt: unknown class 'bolt': the model's "
                                          "classes are ") and "(nothing changed)" in err, err
                    (belt,) = c.list_streams()
                    assert belt.stream_id == "belt" and list(belt.classes) == ["dent"]
        finally:
            c.remove_stream("belt")


def test_apply_knows_the_classes_of_every_device_s_engine(tmp_path, capsys):
    """Devices running engines of other classes (--gpus cpu:2, an engine each): the server takes a camera whose
    classes any of them has (its check unions all devices' engines), and so does `apply`, which read the first
    device's classes only and refused it; a class none has is still refused before anything changes."""
    from zero_model import write_zero_model

    first = write_zero_model(tmp_path / "first.onnx", names={0: "dent", 1: "scratch"})
    second = write_zero_model(tmp_path / "second.onnx", names={0: "crack"})
    srv = ServerProcess("--gpus", "cpu:2", "--engines", f"{first},{second}", "--instances", "1", "--allow-synthetic",
                        "--no-status")
    try:
        at = ("--server", srv.address)
        c = srv.client()
        c.wait_ready(60)
        cameras = tmp_path / "cameras.yaml"
        camera = "streams:\n  - id: press\n    url: 'synthetic://press?fps=2&size=320x180'\n    classes: [{}]\n"
        cameras.write_text(camera.format("crack"))  # the second device's class
        rc, out = run(*at, "apply", str(cameras))
        assert rc == 0 and "1 added" in out, (out, capsys.readouterr().err)
        assert [list(s.classes) for s in c.list_streams()] == [["crack"]]
        cameras.write_text(camera.format("bolt"))
        assert run(*at, "apply", str(cameras)) == (2, "")
        err = capsys.readouterr().err
        assert "unknown class 'bolt': the model's classes are crack, dent, scratch (nothing changed)" in err, err
        assert [list(s.classes) for s in c.list_streams()] == [["crack"]]
        rc, out = run(*at, "info")  # each engine's classes, not the first device's as the server's
        assert rc == 0 and "\n  classes:" not in out, out
        assert re.search(r"engine \S*first.onnx on cpu:0: .*\n    classes: dent, scratch\n", out), out
        assert re.search(r"engine \S*second.onnx on cpu:1: .*\n    classes: crack\n", out), out
        c.close()
    finally:
        srv.close()


def test_snapshot_saves_what_the_camera_sees_with_its_zone_and_published_boxes_drawn(server, tmp_path, capsys):
    """`snapshot ID FILE` saves the camera's picture as the server sent it; with --draw, its zone is outlined and only
    the detections it would publish are drawn. A still belt (speed=0): every snapshot is the same picture, so the
    test can count what the zone keeps of DetectImage's answer for it."""
    from PIL import Image

    from yolov12_serve.filters import DetectionFilter

    at = ("--server", server.address)
    left = [(0.05, 0.05), (0.5, 0.05), (0.5, 0.95), (0.05, 0.95)]
    assert run(*at, "add", "aim", "synthetic://aim?fps=10&size=640x360&speed=0", "--zone",
               ",".join(f"{c:g}" for p in left for c in p))[0] == 0
    try:
        plain, drawn = tmp_path / "aim.jpg", tmp_path / "aim-drawn.png"
        rc, out = run(*at, "snapshot", "aim", str(plain))
        assert rc == 0 and out == f"{plain}: aim 640x360\n"
        assert Image.open(plain).format == "JPEG" and Image.open(plain).size == (640, 360)
        rc, out = run(*at, "--json", "snapshot", "aim", str(drawn), "--draw")
        (said,) = json_lines(out)
        with server.client() as c:
            fd = c.detect_image(plain.read_bytes())
        found = np.array([[d.x1, d.y1, d.x2, d.y2, d.score, d.class_id] for d in fd.detections], np.float32)
        kept = DetectionFilter(zone=left)(found, (360, 640), {})
        assert 0 < len(kept) < len(found), (len(kept), len(found))  # the zone leaves some out, or this shows nothing
        assert rc == 0 and said["saved"] == str(drawn) and said["detections"] == len(kept), (said, len(kept))
        picture = np.asarray(Image.open(drawn).convert("RGB")).astype(int)
        edge = picture[int(0.05 * 360), 64:300]  # the zone's top edge
        assert (np.abs(edge - ctl.ZONE_COLOUR).max(axis=1) < 30).mean() > 0.8
        assert run(*at, "snapshot", "aim", str(tmp_path / "no-such-dir" / "x.jpg"))[0] == 2
        capsys.readouterr()
        assert run(*at, "snapshot", "aim", str(tmp_path))[0] == 2
        assert capsys.readouterr().err == f"yolov12-ctl: {tmp_path} is a folder: give a file name such as " \
                                          f"{tmp_path / 'cam1.jpg'}\n"
    finally:
        run(*at, "remove", "aim")


def test_apply_never_touches_a_pushed_stream_and_compares_urls_masked():
    """A push stream belongs to its live Detect call: --prune leaves it. The server lists URLs with passwords
    masked: the file's URL is compared masked too (else every camera with a password was replaced each time)."""
    from yolov12_serve.config import StreamSpec

    listed = [pb.StreamInfo(stream_id="pusher", url="push://"),
              pb.StreamInfo(stream_id="gate", url="rtsp://op:***@10.0.0.7/s1", max_fps=5, min_score=0.5)]
    wanted = [StreamSpec("gate", "rtsp://op:secret@10.0.0.7/s1", 5.0, 0.5)]
    assert [(a, sid) for a, sid, _ in ctl.plan_apply(wanted, listed, prune=True)] == [("keep", "gate")]
    stricter = [StreamSpec("gate", "rtsp://op:secret@10.0.0.7/s1", 5.0, 0.7)]  # a new threshold: replaced
    assert [(a, sid) for a, sid, _ in ctl.plan_apply(stricter, listed, prune=True)] == [("replace", "gate")]
    zone = ((0.0, 0.1), (1.0, 0.1), (1.0, 0.9))
    listed[1].classes[:] = ["dent"]
    listed[1].zone[:] = [c for p in zone for c in p]
    same = [StreamSpec("gate", "rtsp://op:secret@10.0.0.7/s1", 5.0, 0.5, ("dent",), zone)]
    assert [a for a, _, _ in ctl.plan_apply(same, listed, prune=True)] == ["keep"]  # float32 on the wire: same
    for other in [StreamSpec("gate", "rtsp://op:secret@10.0.0.7/s1", 5.0, 0.5, ("dent", "crack"), zone),
                  StreamSpec("gate", "rtsp://op:secret@10.0.0.7/s1", 5.0, 0.5, ("dent",), zone[:2] + ((0.5, 0.9),)),
                  StreamSpec("gate", "rtsp://op:secret@10.0.0.7/s1", 5.0, 0.5, ("dent",))]:
        assert [a for a, _, _ in ctl.plan_apply([other], listed, prune=True)] == ["replace"], other
    own = [StreamSpec("gate", "rtsp://op:secret@10.0.0.7/s1", 5.0, 0.5, ("dent",), zone, blind_after_s=0)]
    assert [a for a, _, _ in ctl.plan_apply(own, listed, prune=True)] == ["replace"]  # the server's -> its own
    listed[1].blind_after_s = 0
    assert [a for a, _, _ in ctl.plan_apply(own, listed, prune=True)] == ["keep"]
    assert [a for a, _, _ in ctl.plan_apply(same, listed, prune=True)] == ["replace"]  # its own -> the server's
    scored = [dataclasses.replace(own[0], class_min_scores={"dent": 0.3})]
    assert [a for a, _, _ in ctl.plan_apply(scored, listed, prune=True)] == ["replace"]  # a class's own score set
    listed[1].class_min_scores["dent"] = float(np.float32(0.3))
    assert [a for a, _, _ in ctl.plan_apply(scored, listed, prune=True)] == ["keep"]
    assert [a for a, _, _ in ctl.plan_apply([dataclasses.replace(scored[0], class_min_scores={"dent": 0.4})],
                                            listed, prune=True)] == ["replace"]
    assert [a for a, _, _ in ctl.plan_apply(own, listed, prune=True)] == ["replace"]  # and dropped again
    del listed[1].class_min_scores["dent"]
    tracked = [dataclasses.replace(own[0], track=True)]
    assert [a for a, _, _ in ctl.plan_apply(tracked, listed, prune=True)] == ["replace"]  # tracking turned on
    listed[1].track = True
    assert [a for a, _, _ in ctl.plan_apply(tracked, listed, prune=True)] == ["keep"]


def test_detect_prints_what_the_python_client_gets(server, tmp_path):
    from matplotlib import cbook

    photo = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    rc, out = run("--server", server.address, "--json", "detect", str(photo))
    (got,) = json_lines(out)
    with server.client() as c:
        want = c.detect_image(photo)
    assert rc == 0 and got["image"] == str(photo) and (got["width"], got["height"]) == (want.width, want.height)
    assert len(got.get("detections", [])) == len(want.detections) > 0
    assert got["detections"][0]["class_name"] == want.detections[0].class_name
    rc, out = run("--server", server.address, "detect", str(photo))
    assert rc == 0 and out.startswith(f"{photo}: ") and f"{len(want.detections)} detections" in out


def test_detect_save_draws_the_boxes_on_the_picture_as_the_server_saw_it(server, tmp_path, capsys):
    """--save DIR writes each image with its boxes drawn, upright (a sideways-stored portrait PNG here), under its
    own name; a DIR that would overwrite the original is refused in one line."""
    from matplotlib import cbook
    from PIL import Image

    from yolov12_serve.drawing import PALETTE

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
        upright = np.asarray(img.convert("RGB"))  # 600 high, 512 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter: 512 high, 600 wide
    photo = tmp_path / "hopper.png"
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(photo, exif=exif.tobytes())
    rc, out = run("--server", server.address, "--json", "detect", str(photo), "--save", str(tmp_path / "drawn"))
    (got,) = json_lines(out)
    assert rc == 0 and got["saved"] == str(tmp_path / "drawn" / "hopper.png") and (got["width"], got["height"]) == (
        512, 600)
    drawn = np.asarray(Image.open(got["saved"]).convert("RGB"))
    assert drawn.shape == upright.shape and got["detections"]
    first = got["detections"][0]
    x, y = int(first["x1"]), int((first["y1"] + first["y2"]) / 2)  # the box's left edge, halfway down
    edge = {tuple(px) for px in drawn[y, x - 1:x + 3]}
    assert PALETTE[first["class_id"] % len(PALETTE)] in edge, (edge, first)
    before = photo.read_bytes()
    rc, out = run("--server", server.address, "detect", str(photo), "--save", str(tmp_path))
    err = capsys.readouterr().err
    assert (rc, out, photo.read_bytes() == before) == (2, "", True) and err.startswith(
        f"yolov12-ctl: --save {tmp_path} is where {photo} is") and err.count("\n") == 1, err


def test_detect_takes_a_folder_of_images(server, tmp_path, capsys):
    """A folder stands for the images in it, by name (not other files, not subfolders); one with none is one line."""
    from PIL import Image

    parts = tmp_path / "parts"
    (parts / "older").mkdir(parents=True)
    pixels = Image.fromarray(np.full((90, 160, 3), 128, np.uint8))
    for name in ("b.bmp", "a.PNG", "older/c.png"):
        pixels.save(parts / name)
    (parts / "notes.txt").write_text("not an image")
    rc, out = run("--server", server.address, "detect", str(parts))
    assert rc == 0 and [line.split(": ")[0] for line in out.splitlines()] == [str(parts / "a.PNG"),
                                                                              str(parts / "b.bmp")]
    rc, out = run("--server", server.address, "detect", str(parts / "older"), str(tmp_path / "none"))
    assert rc == 2 and out.startswith(f"{parts / 'older' / 'c.png'}: ")  # what came before the unreadable one
    assert capsys.readouterr().err.startswith(f"yolov12-ctl: cannot read {tmp_path}/none")
    (tmp_path / "empty").mkdir()
    rc, _ = run("--server", server.address, "detect", str(tmp_path / "empty"))
    assert rc == 2 and capsys.readouterr().err.startswith(f"yolov12-ctl: no images in {tmp_path / 'empty'} (looked")


def test_detect_sends_machine_vision_formats_as_png_and_refuses_16_bit_in_one_line(server, tmp_path, capsys):
    """BMP and TIFF (what machine-vision cameras save) and WebP are sent as PNG: the same pixels, the same boxes
    as the PNG; a 16-bit TIFF is refused before sending, with what to do (exit 2)."""
    from matplotlib import cbook
    from PIL import Image, features

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
        pixels = img.convert("RGB")
    formats = ["png", "bmp", "tiff"] + (["webp"] if features.check("webp") else [])
    got = {}
    for fmt in formats:
        path = tmp_path / f"hopper.{fmt}"
        pixels.save(path, **({"lossless": True} if fmt == "webp" else {}))
        rc, out = run("--server", server.address, "--json", "detect", str(path))
        assert rc == 0, (fmt, capsys.readouterr().err)
        (result,) = json_lines(out)
        got[fmt] = result.get("detections", [])
    assert got["png"] and all(got[fmt] == got["png"] for fmt in formats), got
    deep = tmp_path / "mono16.tif"
    Image.fromarray(np.full((64, 64), 3000, np.uint16)).save(deep)
    rc, out = run("--server", server.address, "detect", str(deep))
    err = capsys.readouterr().err
    assert (rc, out) == (2, "") and err.startswith(f"yolov12-ctl: {deep}: a TIFF image in mode I;16") and (
        "8-bit RGB" in err and err.count("\n") == 1), err


def test_an_image_sent_as_png_is_turned_upright_first():
    """A sideways-stored WebP (EXIF orientation 6: a camera held in portrait) arrives as the upright picture."""
    from PIL import Image, features

    from yolov12_serve.client import make_frame

    if not features.check("webp"):
        pytest.skip("this Pillow was built without WebP")
    upright = np.random.default_rng(5).integers(0, 255, (48, 32, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(buf, format="WEBP", lossless=True,
                                                                        exif=exif.tobytes())
    frame = make_frame(buf.getvalue())
    with Image.open(io.BytesIO(frame.data)) as sent:
        assert sent.format == "PNG"
        np.testing.assert_array_equal(np.asarray(sent), upright)


def test_info_health_and_the_installed_command(server, monkeypatch):
    monkeypatch.setenv("YOLOV12_SERVER", f" {server.address} ")  # where --server is not given
    rc, out = run("info")
    assert rc == 0 and f"{server.address}: yolov12-serve" in out and "device cpu: healthy" in out
    assert "classes: scratch, dent, crack, stain, missing_part" in out
    done = subprocess.run([sys.executable, "-m", "yolov12_serve.ctl", "health", "--server", server.address],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{server.address}: SERVING\n", "")


@pytest.mark.parametrize("argv, status, line", [
    (("remove", "no-such-cam"), 1, "yolov12-ctl: NOT_FOUND: no stream 'no-such-cam'"),
    (("add", "bad id", "synthetic://x"), 1, "yolov12-ctl: INVALID_ARGUMENT: stream_id 'bad id'"),
    (("add", "c", "synthetic://x", "--classes", "scrach"), 1, "yolov12-ctl: INVALID_ARGUMENT: unknown classes "
     "['scrach'] for stream c: the model's classes are crack, dent, missing_part, scratch, stain"),
    (("add", "c", "synthetic://x", "--zone", "0,0,1,1"), 2, "yolov12-ctl: argument --zone: a zone is a polygon of "
     "at least 3 points"),
    (("add", "c", "synthetic://x", "--zone", "0,0,1,0,left"), 2, "yolov12-ctl: argument --zone: expected numbers"),
    (("add", "c", "synthetic://x", "--class-min-score", "dent"), 2,
     "yolov12-ctl: argument --class-min-score: expected CLASS=SCORE such as dent=0.3, got 'dent'"),
    (("add", "c", "synthetic://x", "--class-min-score", "scrach=0.5"), 1, "yolov12-ctl: INVALID_ARGUMENT: unknown "
     "classes ['scrach']"),
    (("watch", "no-such-cam", "--count", "1"), 1, "yolov12-ctl: NOT_FOUND: "),
    (("--token-file", "/nonexistent/token", "streams"), 2, "yolov12-ctl: cannot read the token file"),
    (("--cert", __file__, "streams"), 2, "yolov12-ctl: --cert and --key go together"),
    (("detect", "/nonexistent.jpg"), 2, "yolov12-ctl: cannot read /nonexistent.jpg"),
    # a typo in --server, or a --tls-ca that is no certificate, read as "is the server running?" (exit 1)
    (("--server", "http://localhost:50051", "streams"), 2, "yolov12-ctl: --server 'http://localhost:50051': expected "
     "HOST:PORT such as localhost:50051 (no http://)"),
    (("--server", "localhost:abc", "streams"), 2, "yolov12-ctl: --server 'localhost:abc': expected HOST:PORT"),
    (("--server", "::1:50051", "health"), 2, "yolov12-ctl: --server '::1:50051': an IPv6 address goes in brackets "
     "before the port, such as [::1]:50051"),
    (("--tls-ca", __file__, "streams"), 2, f"yolov12-ctl: --tls-ca {__file__} is not a PEM file (-----BEGIN"),
    (("detect", __file__), 2, f"yolov12-ctl: {__file__} is not an image (JPEG, PNG, BMP, TIFF, WebP, ... are)"),
])
def test_a_refusal_is_one_line_with_its_status(server, capsys, argv, status, line):
    rc, out = run("--server", server.address, *argv)
    err = capsys.readouterr().err
    assert (rc, out) == (status, "") and err.startswith(line) and err.count("\n") == 1, err


@pytest.mark.skipif(not HAVE_OPENSSL, reason="openssl is needed to make the test certificates")
def test_a_client_key_that_cannot_work_is_one_line_before_connecting(tmp_path, capsys):
    """A key of another certificate or an encrypted key: gRPC logged its own lines ("Invalid private key") and the
    command said the server was unreachable (exit 1); now one line naming the file (exit 2)."""
    ca = make_ca(tmp_path)
    mine, other = make_cert(tmp_path, ca, "mine", client=True), make_cert(tmp_path, ca, "other", client=True)
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(mine.key), "-aes256", "-passout", "pass:secret", "-out",
                    str(encrypted)], check=True)
    for key, line in [(other.key, f"yolov12-ctl: --key {other.key} does not belong to --cert {mine.cert}"),
                      (encrypted, f"yolov12-ctl: --key {encrypted} is encrypted: give it unencrypted")]:
        rc, out = run("--server", "127.0.0.1:1", "--cert", str(mine.cert), "--key", str(key), "health")
        err = capsys.readouterr().err
        assert (rc, out) == (2, "") and err.startswith(line) and err.count("\n") == 1, err
    from yolov12_serve.client import Client

    with pytest.raises(ValueError, match="the client key is encrypted"):  # the Python client: at once, not at a call
        Client("127.0.0.1:1", cert=str(mine.cert), key=str(encrypted))


def test_ctl_pointed_at_the_health_port_says_that_port_answers_health_only(capsys):
    """The plaintext --health-port answers grpc.health.v1 alone: `health` works there, and any other command is
    UNIMPLEMENTED ("Method not found!"), which says nothing to an operator unless the line says where to look."""
    srv = ServerProcess("--health-port", "0", "--no-status")
    try:
        health_port = int(re.search(r"health also on 127\.0\.0\.1:(\d+)", "".join(srv.output)).group(1))
        at = ("--server", f"127.0.0.1:{health_port}")
        assert run(*at, "health") == (0, f"127.0.0.1:{health_port}: SERVING\n")
        assert run(*at, "streams") == (1, "")
        err = capsys.readouterr().err
        assert err.startswith("yolov12-ctl: UNIMPLEMENTED: ") and err.rstrip().endswith(
            "; the server does not offer this call: is --server its gRPC --port (not its --health-port, which answers "
            "health only), and is it as new as this yolov12-ctl?"), err
    finally:
        srv.close()


def test_a_server_that_answers_unavailable_itself_is_quoted_not_called_unreachable():
    """Starting (adding its saved streams) or shutting down, the server was reached and says why: its words, without
    "cannot reach" and the network advice that fits only a connection that failed (that case: the test below)."""
    import grpc

    class Answered(grpc.RpcError):  # the status and details a call raised with (what _one_line reads of it)
        def __init__(self, details: str) -> None:
            self._details = details

        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return self._details

    for said in ("the server is shutting down",
                 "the server is starting and still adding its saved streams; retry in a moment"):
        assert ctl._one_line(Answered(said), ["plant:50051"]) == f"UNAVAILABLE: {said}"
    failed = ctl._one_line(Answered("failed to connect to all addresses"), ["plant:50051"])
    assert failed.startswith("UNAVAILABLE: cannot reach plant:50051 (failed to connect") and "--server" in failed


def test_a_camera_that_sends_nothing_is_not_called_an_unreachable_server(server, tmp_path, capsys):
    """GetSnapshot of a camera that sends no frame is the server's own UNAVAILABLE (marked in its trailers): its
    words, not "cannot reach" with network advice."""
    at = ("--server", server.address)
    assert run(*at, "add", "dark", "rtsp://127.0.0.1:9/none")[0] == 0  # nothing listens there
    try:
        capsys.readouterr()
        assert run(*at, "snapshot", "dark", str(tmp_path / "dark.jpg"))[0] == 1
        err = capsys.readouterr().err
        assert err.startswith("yolov12-ctl: UNAVAILABLE: no frame came from 'dark' in 5 s (it is ") and \
            "cannot reach" not in err and "--server" not in err and err.count("\n") == 1, err
    finally:
        run(*at, "remove", "dark")


def test_an_unreachable_server_says_where_it_looked(capsys):
    rc, _ = run("--server", "127.0.0.1:1", "--timeout", "5", "streams")
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("yolov12-ctl: UNAVAILABLE: cannot reach 127.0.0.1:1") and "--server" in err
    t0 = time.monotonic()  # --follow waits for it instead, until --duration is up
    assert run("--server", "127.0.0.1:1", "watch", "--follow", "--duration", "2") == (0, "")
    err = capsys.readouterr().err
    assert 1.9 < time.monotonic() - t0 < 10 and err.startswith("yolov12-ctl: watch interrupted (UNAVAILABLE: ") and (
        err.count("\n") == 1), err
    assert run("--server", "127.0.0.1:1", "--timeout", "5", "health") == (1, "127.0.0.1:1: UNAVAILABLE\n")
    err = capsys.readouterr().err  # why, on stderr: stdout stays one status line per server for scripts
    assert err.startswith("yolov12-ctl: 127.0.0.1:1: UNAVAILABLE: cannot reach 127.0.0.1:1") and "--server" in err and (
        err.count("\n") == 1), err
    for argv, line in ((["frobnicate"], "argument COMMAND: invalid choice"),
                       (["watch", "--count", "-2"], "argument --count: must be 0 or more, got -2"),
                       (["--timeout", "0", "streams"], "argument --timeout: must be more than 0, got 0")):
        with pytest.raises(SystemExit) as e:
            ctl.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"yolov12-ctl: {line}") and err.count("\n") == 1, err


def test_a_server_without_a_port_is_refused_in_plaintext_and_goes_to_443_over_tls(capsys, monkeypatch):
    """--server localhost went to gRPC's default port, 443, and read as a server that is down; the Python Client
    refuses it the same way. Over TLS it is a gateway's address, and is tried."""
    for argv in (["--server", "localhost"], ["--server", "dns:///localhost"], ["--server", "[::1]"], []):
        if not argv:
            monkeypatch.setenv("YOLOV12_SERVER", "localhost")
        assert run(*argv, "streams") == (2, "")
        err = capsys.readouterr().err
        assert err.startswith("yolov12-ctl: --server '") and "' has no port: add it, such as " in err and (
            ":50051 (plaintext would go to gRPC's default 443; a TLS gateway there: give --tls-ca)" in err) and (
            err.count("\n") == 1), err
    monkeypatch.delenv("YOLOV12_SERVER")
    assert run("--server", "127.0.0.1", "--server-name", "gateway", "--timeout", "5", "streams") == (1, "")
    err = capsys.readouterr().err  # tried over TLS: nothing listens at 127.0.0.1:443 here
    assert err.startswith("yolov12-ctl: UNAVAILABLE: cannot reach 127.0.0.1") and err.count("\n") == 1, err


@pytest.mark.skipif(not HAVE_OPENSSL, reason="needs the openssl command line")
def test_tls_to_a_plaintext_server_or_to_nothing_says_which(server, tmp_path, capsys):
    """--tls-ca against a plaintext server failed its handshake (WRONG_VERSION_NUMBER) and was told that a server
    with mutual TLS wants --cert and --key; it now says the server speaks plaintext. Nothing listening at all is not
    a TLS question either."""
    ca = make_ca(tmp_path, "ca")
    for address, hint in ((server.address, "; the server there speaks plaintext, not TLS: leave out --tls-ca"),
                          ("127.0.0.1:1", "; is the server running there? (--server, or YOLOV12_SERVER)")):
        assert run("--server", address, "--timeout", "5", "--tls-ca", str(ca.cert), "streams") == (1, "")
        err = capsys.readouterr().err
        assert err.startswith(f"yolov12-ctl: UNAVAILABLE: cannot reach {address}") and hint in err and (
            "mutual TLS" not in err and err.count("\n") == 1), err


def test_bytes_that_are_not_utf8_are_one_line_not_a_traceback(tmp_path, capsys):
    """An id or URL typed with bytes UTF-8 has no text for (a Latin-1 terminal; Python hands them over as surrogates)
    ended in protobuf's UnicodeEncodeError traceback, and a binary --token-file in UnicodeDecodeError's."""
    at = ("--server", "127.0.0.1:1", "--timeout", "5")  # refused before any call: nothing listens there
    for argv, shown in ((["add", "cam\udcff", "rtsp://10.0.0.5/s"], "'cam\\xff' is not UTF-8 text"),
                        (["add", "cam", "rtsp://10.0.0.5/\udce9"], "'rtsp://10.0.0.5/\\xe9' is not UTF-8 text"),
                        (["reload", "/models/\udcff.onnx"], "'/models/\\xff.onnx' is not UTF-8 text")):
        assert run(*at, *argv) == (2, "")
        err = capsys.readouterr().err
        assert err.startswith(f"yolov12-ctl: {shown}, which the server takes") and err.count("\n") == 1, err
    token = tmp_path / "token"
    token.write_bytes(b"\xff\xfe\x00t")
    assert run(*at, "--token-file", str(token), "streams") == (2, "")
    err = capsys.readouterr().err
    assert err == f"yolov12-ctl: {token} is not a text file: it must hold the token alone (one line, no spaces)\n"


def test_every_argument_of_every_command_is_explained_in_its_help():
    """`yolov12-ctl remove --help` showed a bare STREAM_ID: every argument of every command now says what it is."""
    import argparse

    def unexplained(parser: argparse.ArgumentParser, name: str) -> list[str]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found += [u for sub, p in action.choices.items() for u in unexplained(p, f"{name} {sub}")]
            elif not action.help:
                found.append(f"{name} {action.metavar or action.dest}")
        return found

    assert unexplained(ctl.build_parser(), "yolov12-ctl") == []


def test_watch_lines_show_each_tracked_object_s_id():
    fd = pb.FrameDetections(stream_id="belt", frame_id=7, width=640, height=360, latency_ms=3.0, detections=[
        pb.Detection(x1=1, y1=2, x2=30, y2=40, score=0.91, class_id=1, class_name="dent", track_id=12),
        pb.Detection(x1=5, y1=6, x2=9, y2=9, score=0.5, class_id=2, class_name="crack")])  # seen once: no id yet
    assert ctl._describe(fd) == ("belt #7 640x360 3.0 ms: 2 detections: dent [12] 0.91 (1,2,30,40), "
                                 "crack 0.50 (5,6,9,9)")


def test_reload_sends_absolute_paths(server, capsys, monkeypatch, tmp_path):
    """A relative engine path was read from the server's working directory and shown relative by `info`: one that
    exists here goes as its absolute path, one that does not is refused before a call (exit 2)."""
    from test_server_harness import model_path

    model = tmp_path / "line1.onnx"
    shutil.copy(model_path(), model)
    monkeypatch.chdir(tmp_path)
    rc, out = run("--server", server.address, "--json", "reload", "line1.onnx")
    assert rc == 0 and {e["path"] for e in json_lines(out)} == {str(model)}, out
    rc, _ = run("--server", server.address, "reload", "nowhere.onnx")
    err = capsys.readouterr().err
    assert rc == 2 and "give the engine file's absolute path on the server's machine" in err, err


def test_an_object_record_has_its_ids_as_numbers():
    """`watch --objects --json` and MQTT objects: frame_id, capture_time_us and track_id all numbers (proto3's JSON
    wrote the 64-bit track_id as a string beside a numeric frame_id); the detection's other fields as before."""
    from yolov12_serve.client import object_dict

    fd = pb.FrameDetections(stream_id="belt", frame_id=7, capture_time_us=1_700_000_000_123_456)
    d = pb.Detection(x1=1, y1=2, x2=30, y2=40, score=0.5, class_id=1, class_name="dent", track_id=12)
    record = json.loads(json.dumps(object_dict(fd, d)))
    assert (record["frame_id"], record["capture_time_us"], record["track_id"]) == (7, 1_700_000_000_123_456, 12)
    assert record["class_name"] == "dent" and record["x2"] == 30 and record["time"] == "2023-11-14T22:13:20.123Z"


def test_a_last_error_says_how_old_it_is():
    assert [ctl._ago(s) for s in (0.4, 59, 60, 3599, 7200, 3 * 86400)] == [
        "0 s ago", "59 s ago", "1 min ago", "59 min ago", "2 h ago", "3 d ago"]
    info = pb.StreamInfo(last_error="refused", last_error_age_s=2.4, failing_for_s=3700)
    assert ctl._last_error(info) == "refused (2 s ago, failing for 1 h)"
    info.failing_for_s = 2.9  # failing since this one error: said once
    assert ctl._last_error(info) == "refused (2 s ago)"
    info.failing_for_s = 0  # streaming again: the error is history
    assert ctl._last_error(info) == "refused (2 s ago)"
