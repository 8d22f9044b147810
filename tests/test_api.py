"""The gRPC API against the real server (subprocess, ONNX Runtime engine, torch blocked) over a loopback socket:
DetectImage on a photograph, push mode, watching streams, every error code, health, reflection, /metrics."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from test_server_harness import ServerProcess, model_path, wait_until

from yolov12_serve.client import make_frame
from yolov12_serve.drawing import PALETTE
from yolov12_serve.proto import detector_pb2 as pb

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module", params=["off", "on"], ids=["one-process", "device-process"])
def server(request, tmp_path_factory):
    """Every API test runs against both layouts: the device in the server's own process, and in a process of its
    own (--worker-processes on: frames decoded there, pushed bytes and results over its pipe)."""
    # --process-late: these tests compare answers, and a pushed frame may be dropped as late on a busy machine
    evidence = tmp_path_factory.mktemp("evidence")
    srv = ServerProcess("--worker-processes", request.param, "--max-streams", "4", "--max-message-mb", "1",
                        "--subscriber-queue", "8", "--instances", "2", "--process-late", "--allow-synthetic",
                        "--blind-after-s", "1", "--evidence-dir", str(evidence))
    srv.evidence = evidence
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    c = server.client()
    c.wait_ready(30)
    yield c
    c.close()


@pytest.fixture(scope="module")
def engine():
    import engines

    e = engines.load(model_path(), instances=1)
    yield e
    e.close()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real photograph (matplotlib ships it): Grace Hopper, 512x600 RGB."""
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def expected_detections(engine, image: np.ndarray) -> np.ndarray:
    """The engine run directly on the letterboxed image, boxes mapped back to the photograph's pixels."""
    from engines.letterbox import fit_shape, plan_letterbox

    info = engine.info
    lb = plan_letterbox(image.shape[:2], fit_shape(image.shape[:2], info.imgsz, info.stride, rect=info.dynamic_hw))
    resized = np.asarray(Image.fromarray(image).resize(lb.new_hw[::-1], Image.BILINEAR, reducing_gap=None))
    return lb.unscale(engine.infer(lb.place(resized)[None])[0])


def as_array(fd: pb.FrameDetections) -> np.ndarray:
    return np.array([[d.x1, d.y1, d.x2, d.y2, d.score, d.class_id] for d in fd.detections], np.float32).reshape(-1, 6)


def assert_same_detections(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    order_g, order_w = np.lexsort(got.T[::-1]), np.lexsort(want.T[::-1])
    np.testing.assert_allclose(got[order_g], want[order_w], atol=0.05)


# ------------------------------------------------------------------------------------------------ service basics
def test_health_reflection_and_server_info(client, server):
    assert client.health() == "SERVING"
    assert client.health("yolov12.v1.Detector") == "SERVING"
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="yolov12.v1.Detector")]
    answers = list(stub.ServerReflectionInfo(iter(reqs), timeout=10))
    services = {s.name for s in answers[0].list_services_response.service}
    assert {"yolov12.v1.Detector", "grpc.health.v1.Health"} <= services
    assert answers[1].file_descriptor_response.file_descriptor_proto  # the proto, for grpcurl and friends
    info = client.server_info()
    assert info.slo_ms == 45 and info.devices == ["cpu"] and info.input_height == 320
    assert list(info.class_names)[:5] == ["scratch", "dent", "crack", "stain", "missing_part"]
    assert info.engines[0].dynamic_hw and info.engines[0].instances == 2 and info.max_streams == 4


# ------------------------------------------------------------------------------------------------ the client's frames
def test_add_stream_names_the_argument_of_the_wrong_type():
    """protobuf said "must be real number, not str" or "bad argument type for built-in operation", naming none."""
    from yolov12_serve.client import Client

    with Client("127.0.0.1:1") as c:  # refused before any call: nothing listens there
        for kwargs, said in [({"max_fps": "5"}, "max_fps takes a number, got '5'"),
                             ({"track": "no"}, "track takes bool, got 'no'"),
                             ({"blind_after_s": "3"}, "blind_after_s takes a number or None"),
                             ({"classes": [2]}, "classes are the model's class names (str), got [2]"),
                             ({"class_min_scores": ["dent"]}, "class_min_scores maps class names (str) to scores"),
                             ({"zone": "0,0,1,0,1,1"}, "zone takes (x, y) pairs or the same numbers flat"),
                             ({"zone": [("a", "b")]}, "zone takes (x, y) pairs or the same numbers flat")]:
            with pytest.raises(TypeError, match=re.escape(f"add_stream: {said}")):
                c.add_stream("cam", "rtsp://10.0.0.5/s", **kwargs)


def test_a_client_target_that_cannot_work_is_a_value_error_at_once():
    """Client("http://localhost:50051") was made, and its first call UNAVAILABLE "Misformatted domain name"; None
    was an AttributeError, "" a gRPC error log."""
    from yolov12_serve.client import Client

    for target in ("http://localhost:50051", "https://detector.plant:50051", "grpc://localhost:50051", "", None):
        with pytest.raises(ValueError, match=r"expected HOST:PORT such as localhost:50051 \(no http://"):
            Client(target)
    Client("dns:///localhost:50051").close()  # gRPC's own target forms still go through


def test_a_plaintext_client_target_without_a_port_is_a_value_error_at_once():
    """Client("localhost") went to gRPC's default port, 443, where no yolov12-serve listens in plaintext, and failed at
    the first call; over TLS a gateway may be there, so it is made."""
    from yolov12_serve.client import Client

    for target in ("localhost", "10.0.0.5", "[::1]", "dns:///localhost", "localhost:"):
        with pytest.raises(ValueError, match=rf"^target '{re.escape(target)}' has no port: add it, such as "
                                             rf"{re.escape(target)}:50051 \(plaintext would go to gRPC's default 443"):
            Client(target)
    for target, tls in (("localhost", {"tls": True}), ("gateway.plant", {"server_name": "gateway.plant"}),
                        ("localhost:50051", {}), ("[::1]:50051", {}), ("unix:/run/yolov12.sock", {})):
        Client(target, **tls).close()


def test_a_client_timeout_that_cannot_work_is_an_error_at_once():
    """Client(timeout="5") failed only at the first call ("unsupported operand type(s) for +"), and 0, a negative
    number or inf ended every call at once in DEADLINE_EXCEEDED; None (no deadline) still goes through."""
    from yolov12_serve.client import Client, FollowedWatch

    for timeout, error in (("5", TypeError), (True, TypeError), (0, ValueError), (-1.0, ValueError),
                           (float("inf"), ValueError), (float("nan"), ValueError)):
        with pytest.raises(error, match=r"^Client: timeout .*a number of seconds above 0 or None \(no deadline\), "
                                        r"such as timeout=10, got "):
            Client("127.0.0.1:1", timeout=timeout)
    with Client("127.0.0.1:1", timeout=None) as c:  # nothing listens there: no call is made
        for call in (lambda: c.watch("belt", timeout=0), lambda: c.watch("belt", timeout=0, follow=True),
                     lambda: c.detect([], timeout="5"), lambda: c.reload_engines(timeout=-1)):
            with pytest.raises((TypeError, ValueError), match=r"^(watch|detect|reload_engines): timeout "):
                call()
        with pytest.raises(ValueError, match=r"^wait_ready: timeout must be a number of seconds above 0, such as"):
            c.wait_ready(0)
        with pytest.raises(TypeError, match=r"^wait_ready: timeout takes a number of seconds above 0, such as"):
            c.wait_ready(None)
        with pytest.raises(ValueError, match=r"^FollowedWatch: timeout must be"):
            FollowedWatch(lambda left: None, timeout=0)
    Client("127.0.0.1:1", timeout=2.5).close()


def test_reload_engines_takes_one_file_alone_and_paths():
    """c.reload_engines("new.onnx") sent each letter as an engine file: the server answered "14 engine files for 1
    devices"; and a Path in the list was protobuf's TypeError."""
    from yolov12_serve.client import Client

    sent: list[list[str]] = []

    class Stub:  # what ReloadEngines was asked (nothing listens at 127.0.0.1:1)
        def ReloadEngines(self, request, timeout):  # noqa: N802 (the RPC's name)
            sent.append(list(request.engines))
            return pb.ReloadEnginesResponse()

    with Client("127.0.0.1:1") as c:
        c.stub = Stub()
        for engines in ("/m/new.onnx", Path("/m/new.onnx"), [Path("/m/new.onnx")], ["/m/new.onnx"]):
            assert c.reload_engines(engines) == []
        assert c.reload_engines() == []
    assert sent == [["/m/new.onnx"]] * 4 + [[]]


def test_make_frame_takes_mono_and_pil_pixels_and_refuses_what_it_would_have_to_guess():
    """A machine-vision SDK hands out mono [H, W] uint8 arrays, a script PIL images: both are sent as RGB. Other
    dtypes are refused with what to do: they were cast to uint8 (uint16 3000 became 184, floats in 0..1 black)."""
    def sent(image) -> np.ndarray:
        return np.frombuffer(make_frame(image, encoding="rgb").data, np.uint8).reshape(48, 64, 3)

    mono = np.random.default_rng(3).integers(0, 255, (48, 64), np.uint8)
    rgb = np.repeat(mono[..., None], 3, axis=2)
    for image in (mono, mono[..., None], rgb, Image.fromarray(mono), Image.fromarray(rgb)):
        np.testing.assert_array_equal(sent(image), rgb)
    for bad, match in [(rgb.astype(np.float32) / 255, "uint8 pixels .* got float32: convert first"),
                       (rgb.astype(np.uint16) * 16, "got uint16"),
                       (np.zeros((48, 64, 4), np.uint8), r"RGB image \[H, W, 3\] \(or mono \[H, W\]\), got shape "
                                                          r"\[48, 64, 4\]"),
                       (Image.fromarray(mono.astype(np.uint16) * 200), "mode I;16")]:
        with pytest.raises(ValueError, match=match):
            make_frame(bad)


# ------------------------------------------------------------------------------------------------ DetectImage, Detect
def test_detect_image_on_a_photograph_in_source_pixels(client, engine, photo):
    want = expected_detections(engine, photo)
    h, w = photo.shape[:2]
    for encoding in ("png", "rgb", "bgr"):  # lossless: exactly the engine's answer on these pixels
        fd = client.detect_image(make_frame(photo, "hopper", 7, encoding=encoding, capture_time_us=123))
        assert (fd.stream_id, fd.frame_id, fd.width, fd.height, fd.capture_time_us) == ("hopper", 7, w, h, 123)
        got = as_array(fd)
        assert_same_detections(got, want)
        if len(got):
            assert got[:, [0, 2]].max() <= w and got[:, [1, 3]].max() <= h and got[:, :4].min() >= 0
            assert {d.class_name for d in fd.detections} <= set(client.server_info().class_names)
        assert 0 < fd.latency_ms < 10_000
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:  # the JPEG file as is
        fd = client.detect_image(f.read())
    assert_same_detections(as_array(fd), want)


def test_push_mode_answers_every_frame_in_order_and_lists_the_stream(client, engine, photo):
    rng = np.random.default_rng(0)
    frames = [np.ascontiguousarray(np.roll(photo, int(s), axis=1)) for s in rng.integers(0, 200, 6)]
    seen_listed = threading.Event()
    snapshot_codes = []  # GetSnapshot of a pushed stream: its pictures are the client's

    def gen():
        for i, f in enumerate(frames):
            yield make_frame(f, "pusher", 100 + i, encoding="png")
            if i == 3 and any(s.stream_id == "pusher" and s.url == "push://" for s in client.list_streams()):
                seen_listed.set()
                snapshot_codes.append(code_of(lambda: client.snapshot("pusher")))

    results = list(client.detect(gen(), timeout=60))
    assert [r.frame_id for r in results] == [100 + i for i in range(6)]
    assert all(r.stream_id == "pusher" for r in results)
    for r, f in zip(results, frames):
        assert_same_detections(as_array(r), expected_detections(engine, f))
    assert seen_listed.is_set() and snapshot_codes == [grpc.StatusCode.FAILED_PRECONDITION]
    wait_until(lambda: client.stream("pusher") is None, 5, what="push stream removed after the call")


# ------------------------------------------------------------------------------------------------ pulled streams
def test_watch_streams_in_order_and_a_slow_watcher_does_not_stall_others(client, server):
    for i in (1, 2):
        info = client.add_stream(f"belt{i}", f"synthetic://belt{i}?fps=10&size=640x360")
        assert info.state in (pb.STREAM_STATE_CONNECTING, pb.STREAM_STATE_STREAMING) and info.device == "cpu"
    slow = client.watch()  # never read for a while: its own queue overflows, nobody else notices
    fast = client.watch(["belt1", "belt2"])
    got: dict[str, list[pb.FrameDetections]] = {"belt1": [], "belt2": []}
    t0 = time.monotonic()
    try:
        for fd in fast:
            got[fd.stream_id].append(fd)
            if min(len(v) for v in got.values()) >= 12 or time.monotonic() - t0 > 30:
                break
        first_slow = next(slow)
    finally:
        fast.cancel()
        slow.cancel()
    for sid, fds in got.items():
        assert len(fds) >= 12, f"{sid}: {len(fds)} results"
        ids = [fd.frame_id for fd in fds]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        assert all(fd.width == 640 and fd.height == 360 for fd in fds)
        boxes = np.concatenate([as_array(fd) for fd in fds])
        if len(boxes):
            assert boxes[:, [0, 2]].max() <= 640 and boxes[:, [1, 3]].max() <= 360
    assert first_slow.stream_id in ("belt1", "belt2")
    listed = {s.stream_id: s for s in client.list_streams()}
    assert listed["belt1"].state == pb.STREAM_STATE_STREAMING and listed["belt1"].frames_processed >= 12
    assert listed["belt1"].fps > 0 and listed["belt1"].width == 640
    for i in (1, 2):
        assert client.remove_stream(f"belt{i}").state == pb.STREAM_STATE_STOPPED
    assert client.list_streams() == []


def test_a_watch_is_read_in_the_callers_thread_and_outlives_the_client_that_made_it(server):
    """`Client.watch` reads each result in the thread that iterates it: no channel thread woken for every message
    (0.53 -> 0.41 ms of client CPU per result at 80/s here). And a watch made by a client that is then dropped
    keeps reading: it holds its channel."""
    import gc

    server.client().add_stream("spin", "synthetic://spin?fps=20&size=320x180")
    before = set(threading.enumerate())
    watch = server.client().watch(["spin"])  # its Client is garbage at once
    gc.collect()
    try:
        got = [next(watch).frame_id for _ in range(5)]
        extra = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    finally:
        watch.cancel()
        server.client().remove_stream("spin")
    assert got == sorted(got) and len(set(got)) == 5
    assert extra == [], f"threads started to read the watch: {extra}"
    with pytest.raises(grpc.RpcError) as e:
        next(watch)
    assert e.value.code() == watch.code() == grpc.StatusCode.CANCELLED  # the call's own methods still answer


# ------------------------------------------------------------------------------------------------ errors
def code_of(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    assert e.value.details()  # every error says what was wrong
    return e.value.code()


INVALID = grpc.StatusCode.INVALID_ARGUMENT


def png_header_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG that say width x height (the pixel data is one short row): a bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(1 + 3 * width)))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("stream_id,url", [
    ("cam", "http://example.com/stream"),  # unsupported scheme
    ("cam", "rtsp://"),  # no host
    ("cam", "not a url"),  # whitespace
    ("cam", "/etc/passwd"),  # a file without --allow-files
    ("cam", "synthetic://x?colour=red"),  # bad synthetic parameters
    ("", "rtsp://10.0.0.1/s"),  # empty id
    ("x" * 129, "rtsp://10.0.0.1/s"),  # over-long id
    ("has space", "rtsp://10.0.0.1/s"),
])
def test_bad_stream_requests_are_invalid_argument(client, stream_id, url):
    assert code_of(lambda: client.add_stream(stream_id, url)) == INVALID


def test_error_codes(client, photo):
    client.add_stream("dup", "synthetic://dup?fps=5")
    try:
        assert code_of(lambda: client.add_stream("dup", "synthetic://other")) == grpc.StatusCode.ALREADY_EXISTS
    finally:
        client.remove_stream("dup")
    assert code_of(lambda: client.remove_stream("nope")) == grpc.StatusCode.NOT_FOUND
    for call in (client.remove_stream, client.snapshot, lambda sid: next(client.watch([sid]))):
        with pytest.raises(grpc.RpcError) as e:  # quoted whole, a 100 KB id overflowed the 16 KB status trailer
            call("x" * 100_000)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "(100000 characters)" in e.value.details()
    assert code_of(lambda: client.detect_image(make_frame(photo[:64, :64], "has space", 0, "png"))) == INVALID
    assert code_of(lambda: next(client.watch(["nope"]))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.detect_image(b"\xff\xd8\xff\xe0 not really a jpeg")) == INVALID
    assert code_of(lambda: client.detect_image(b"GIF89a....")) == INVALID
    assert code_of(lambda: client.detect_image(png_header_claiming(8000, 6000))) == INVALID  # 48M pixels
    # Pillow's own limit and its "cannot identify <_io.BytesIO object at 0x...>" said in our words
    for data, said in [(png_header_claiming(20000, 20000), "at most 40M pixels and 16384 on a side"),
                       (pb.Frame(data=b"junk", encoding=pb.ENCODING_JPEG), "not an image Pillow recognises")]:
        with pytest.raises(grpc.RpcError) as e:
            client.detect_image(data)
        assert e.value.code() == INVALID and said in e.value.details(), e.value.details()
    bad_raw = pb.Frame(data=b"\x00" * 100, encoding=pb.ENCODING_RGB24, width=640, height=360)
    assert code_of(lambda: client.detect_image(bad_raw)) == INVALID
    assert code_of(lambda: client.detect_image(pb.Frame(data=b"", encoding=pb.ENCODING_PNG))) == INVALID
    bad_push = iter([make_frame(photo[:64, :64], "p1", 0, encoding="png"), pb.Frame(stream_id="p1", data=b"junk")])
    assert code_of(lambda: list(client.detect(bad_push, timeout=30))) == INVALID
    mixed = iter([make_frame(photo[:64, :64], "p2", 0, "png"), make_frame(photo[:64, :64], "p3", 1, "png")])
    assert code_of(lambda: list(client.detect(mixed, timeout=30))) == INVALID
    with pytest.raises(ValueError, match="float32"):  # the caller's own error, not UNKNOWN "Exception iterating"
        list(client.detect([photo[:64, :64], np.zeros((64, 64, 3), np.float32)], stream_id="p4", timeout=30))
    with pytest.raises(grpc.RpcError) as e:  # one id alone: not the ids 'n', 'o', 'p', 'e'
        next(client.watch("nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in e.value.details()
    # larger than --max-message-mb 1
    huge = pb.Frame(data=bytes(3 * 700 * 700), encoding=pb.ENCODING_RGB24, width=700, height=700)
    assert code_of(lambda: client.detect_image(huge)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.list_streams() == []


def test_a_bad_pushed_frame_ends_the_call_after_the_frames_before_it_are_answered(client, photo):
    """The call ends INVALID_ARGUMENT naming the bad frame; the good frames sent before it still get their results
    (the frame before the bad one was lost, the call ended as soon as the bad one was read)."""
    good = [make_frame(photo[:64, :64], "goodbad", i, "png") for i in range(3)]
    results, call = [], client.detect(iter([*good, pb.Frame(stream_id="goodbad", data=b"junk", frame_id=99)]),
                                      timeout=30)
    with pytest.raises(grpc.RpcError) as e:
        for fd in call:
            results.append(fd.frame_id)
    assert e.value.code() == INVALID and e.value.details().startswith("frame 99: "), e.value.details()
    assert results == [0, 1, 2]


def test_snapshots_waiting_for_a_dead_camera_hold_up_no_other_call(client):
    """Each GetSnapshot of a camera that sends nothing waits 5 s: in threads of their own (8), so AddStream is
    answered meanwhile (it waited behind them in the loop's shared threads), and more at once are refused."""
    from yolov12_serve.api import SNAPSHOT_WAITS

    client.add_stream("silent", "rtsp://127.0.0.1:9/none")  # nothing listens there: it never sends a frame
    answers = []  # (code, when)

    def snap() -> None:
        code = code_of(lambda: client.snapshot("silent"))
        answers.append((code, time.monotonic()))

    threads = [threading.Thread(target=snap) for _ in range(SNAPSHOT_WAITS + 4)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.5)
        client.add_stream("meanwhile", "synthetic://meanwhile?fps=2&size=320x180")
        added = time.monotonic()
        for t in threads:
            t.join(30)
        codes = [code for code, _ in answers]
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 4, codes
        assert codes.count(grpc.StatusCode.UNAVAILABLE) == SNAPSHOT_WAITS, codes  # "no frame came ... in 5 s"
        assert added < min(when for code, when in answers if code == grpc.StatusCode.UNAVAILABLE)
    finally:
        client.remove_stream("silent")
        if client.stream("meanwhile"):
            client.remove_stream("meanwhile")


def test_stream_limit_is_resource_exhausted_and_counts_cameras_and_pushed_streams_apart(client):
    """--max-streams cameras, and as many Detect calls: a viewer's pushes (viewers may push) took the slots an
    operator's AddStream needed."""
    ids = [f"lim{i}" for i in range(4)]
    release = threading.Event()

    def held(i: int):  # a Detect call that stays open after its first frame
        yield make_frame(np.zeros((64, 64, 3), np.uint8), f"push{i}", 0)
        release.wait(60)

    pushes = [client.detect(held(i), stream_id=f"push{i}") for i in range(4)]
    try:
        for call in pushes:
            next(call)  # answered: its stream is registered
        for sid in ids:
            client.add_stream(sid, f"synthetic://{sid}?fps=2&size=320x180")  # four pushes open: cameras still go in
        with pytest.raises(grpc.RpcError) as e:
            client.add_stream("one-more", "synthetic://x")
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "4 cameras" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            next(client.detect(held(4), stream_id="push4"))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "4 Detect calls" in e.value.details()
    finally:
        release.set()
        for call in pushes:
            call.cancel()
        for sid in ids:
            if client.stream(sid):
                client.remove_stream(sid)


# ------------------------------------------------------------------------------------------------ metrics, stubs
NAMES = ["yolov12_frame_latency_seconds_bucket", "yolov12_inference_seconds_bucket", "yolov12_batch_size_bucket",
         "yolov12_frames_total", "yolov12_frames_processed_total", "yolov12_frames_dropped_total",
         "yolov12_stream_reconnects_total", "yolov12_streams", "yolov12_queue_depth", "yolov12_slo_seconds"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_metrics_pass_promtool_and_carry_the_names(client, server):
    client.add_stream("metered", "synthetic://metered?fps=10&size=640x360")
    try:
        wait_until(lambda: (client.stream("metered").frames_processed or 0) >= 3, 30, what="3 frames processed")
        text = server.metrics()
    finally:
        client.remove_stream("metered")
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    for name in NAMES:
        assert name in text, name
    assert 'yolov12_frames_processed_total{device="cpu",stream="metered"}' in text
    assert 'yolov12_slo_seconds 0.045' in text
    assert 'yolov12_streams{state="STREAMING"} 1.0' in text
    assert 'le="0.045"' in text and 'le="0.0405"' in text  # buckets dense around the SLO
    after = server.metrics()
    assert 'stream="metered"' not in after  # removed streams leave no series behind


def first_results(client, stream_id: str, frames: int) -> list[pb.FrameDetections]:
    """The next `frames` results published for one stream."""
    watch = client.watch([stream_id])
    got: list[pb.FrameDetections] = []
    try:
        for fd in watch:
            got.append(fd)
            if len(got) >= frames:
                break
    finally:
        watch.cancel()
    return got


def results_of_a_camera(client, stream_id: str, url: str, frames: int) -> list[pb.FrameDetections]:
    """Add a camera, take its next `frames` results, remove it."""
    client.add_stream(stream_id, url)
    try:
        return first_results(client, stream_id, frames)
    finally:
        client.remove_stream(stream_id)


def test_a_camera_s_min_score_keeps_its_weaker_detections_from_everyone(client, server):
    """AddStream min_score: the line's own threshold. Scenes of the same synthetic camera, watched with no threshold
    and with one at their median score: the second camera's published detections (and counted ones) all reach it,
    ListStreams shows it, and a value outside 0..1 is INVALID_ARGUMENT."""

    def scores(sid: str, frames: int) -> list[float]:
        return [d.score for fd in first_results(client, sid, frames) for d in fd.detections]

    url = "synthetic://scored?fps=10&size=640x360"
    seen = [d.score for fd in results_of_a_camera(client, "open", url, 20) for d in fd.detections]
    threshold = float(np.median(seen))
    assert min(seen) < threshold, seen  # some detections below it, or this test shows nothing
    client.add_stream("strict", url, min_score=threshold)
    try:
        assert client.stream("strict").min_score == pytest.approx(threshold)
        kept = scores("strict", 20)
        assert kept and min(kept) >= threshold - 1e-6, (threshold, sorted(kept)[:5])
        counted = re.findall(r'^yolov12_detections_total\{class="[^"]+",stream="strict"\} (\S+)$', server.metrics(),
                             flags=re.M)
        assert counted and sum(map(float, counted)) >= len(kept)
    finally:
        client.remove_stream("strict")
    assert code_of(lambda: client.add_stream("bad", url, min_score=1.5)) == INVALID
    assert client.list_streams() == []


def test_a_class_s_own_min_score_on_a_live_camera(client, server):
    """AddStream class_min_scores: with min_score 1 (nothing else published) and the most seen class given its
    median score, the camera publishes that class only, from that score; ListStreams shows it; an unknown class
    or a score outside 0..1 is INVALID_ARGUMENT."""
    url = "synthetic://per-class?fps=10&size=640x360"
    seen = [(d.class_name, d.score) for fd in results_of_a_camera(client, "open", url, 20) for d in fd.detections]
    wanted = max({c for c, _ in seen}, key=[c for c, _ in seen].count)
    threshold = float(np.median([s for c, s in seen if c == wanted]))
    assert any(s < threshold for c, s in seen if c == wanted), seen  # some of it below, or this shows nothing
    client.add_stream("own", url, min_score=1.0, class_min_scores={wanted: threshold})
    try:
        assert dict(client.stream("own").class_min_scores) == pytest.approx({wanted: threshold})
        kept = [(d.class_name, d.score) for fd in first_results(client, "own", 20) for d in fd.detections]
        assert kept and all(c == wanted and s >= threshold - 1e-6 for c, s in kept), (wanted, threshold, kept)
    finally:
        client.remove_stream("own")
    with pytest.raises(grpc.RpcError) as e:
        client.add_stream("bad", url, class_min_scores={"scrach": 0.5})
    assert e.value.code() == INVALID and "unknown classes ['scrach']" in e.value.details()
    assert code_of(lambda: client.add_stream("bad", url, class_min_scores={wanted: 1.5})) == INVALID
    assert client.list_streams() == []


def test_a_camera_s_classes_and_zone_keep_the_rest_from_everyone(client, server):
    """AddStream classes and zone: watched with them, the same synthetic camera publishes only detections of the
    class asked for whose box centre is in the zone (a left part of the frame), ListStreams shows both, and an unknown
    class or a zone that is no polygon is INVALID_ARGUMENT saying what is wrong. (The zone's edge is where the
    class's detections are split in half: the belt moves on, so a fixed edge may have nothing on one side.)"""

    def found(sid: str, frames: int) -> list[tuple[str, float, float]]:  # (class, centre x, centre y) in fractions
        return [(d.class_name, (d.x1 + d.x2) / 2 / fd.width, (d.y1 + d.y2) / 2 / fd.height)
                for fd in first_results(client, sid, frames) for d in fd.detections]

    url = "synthetic://zoned?fps=10&size=640x360"
    seen = [(d.class_name, (d.x1 + d.x2) / 2 / fd.width, (d.y1 + d.y2) / 2 / fd.height)
            for fd in results_of_a_camera(client, "whole", url, 30) for d in fd.detections]
    wanted = max({c for c, _, _ in seen}, key=[c for c, _, _ in seen].count)
    edge = round(float(np.median([x for c, x, _ in seen if c == wanted])), 3)  # the zone: left of the class's median
    left = [(0.0, 0.0), (edge, 0.0), (edge, 1.0), (0.0, 1.0)]
    assert any(c != wanted for c, _, _ in seen) and any(x > edge for c, x, _ in seen if c == wanted), seen
    client.add_stream("narrow", url, classes=[wanted], zone=left)
    try:
        info = client.stream("narrow")
        assert list(info.classes) == [wanted] and list(info.zone) == pytest.approx([0, 0, edge, 0, edge, 1, 0, 1])
        kept = found("narrow", 30)
        assert kept and all(c == wanted and x <= edge + 1e-6 for c, x, _ in kept), kept
    finally:
        client.remove_stream("narrow")
    flat = client.add_stream("flat", url, classes=wanted, zone=np.ravel(left))  # one name; corners given flat
    client.remove_stream("flat")
    assert list(flat.classes) == [wanted] and list(flat.zone) == pytest.approx([0, 0, edge, 0, edge, 1, 0, 1])
    with pytest.raises(grpc.RpcError) as e:
        client.add_stream("bad", url, classes=["scrach"])
    assert e.value.code() == INVALID and "unknown classes ['scrach']" in e.value.details() \
        and wanted in e.value.details()  # the model's classes listed
    assert code_of(lambda: client.add_stream("bad", url, zone=[(0, 0), (1, 1)])) == INVALID
    assert code_of(lambda: client.stub.AddStream(pb.AddStreamRequest(stream_id="bad", url=url, zone=[0, 0, 1]),
                                                 timeout=10)) == INVALID
    assert client.list_streams() == []


def test_a_snapshot_is_the_camera_s_next_picture_full_size(client, server):
    """GetSnapshot: a JPEG of the camera's own size that is a frame of what it films (a synthetic camera's belt
    strip, found at one offset to within JPEG's loss); an unknown id is NOT_FOUND, a camera that sends nothing is
    UNAVAILABLE saying its state."""
    import io

    from yolov12_serve.sources.synthetic import parse_synthetic_url, render_strip

    url = "synthetic://aimed?fps=10&size=640x360"
    client.add_stream("aimed", url)
    client.add_stream("dark", "rtsp://127.0.0.1:9/none")  # nothing listens there: it never sends a frame
    try:
        shot = client.snapshot("aimed")
        picture = Image.open(io.BytesIO(shot.jpeg))
        assert picture.format == "JPEG" and picture.size == (shot.width, shot.height) == (640, 360)
        seen = np.asarray(picture.convert("RGB"), np.int16)[::6, ::6]
        strip = render_strip(parse_synthetic_url(url)).astype(np.int16)
        errors = [float(np.abs(strip[::6, x:x + 640:6] - seen).mean()) for x in range(0, strip.shape[1] - 639, 2)]
        assert min(errors) < 3 < 10 < np.median(errors), (min(errors), np.median(errors))
        with pytest.raises(grpc.RpcError) as e:
            client.snapshot("dark")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "no frame came from 'dark' in 5 s (it is " \
            in e.value.details(), e.value.details()
        dark, aimed = client.stream("dark"), client.stream("aimed")  # news or history: how old the last error is
        assert dark.last_error and 0 < dark.last_error_age_s < 60, (dark.last_error, dark.last_error_age_s)
        assert (aimed.last_error, aimed.last_error_age_s) == ("", 0)
    finally:
        client.remove_stream("aimed")
        client.remove_stream("dark")
    assert code_of(lambda: client.snapshot("aimed")) == grpc.StatusCode.NOT_FOUND


def test_a_tracked_camera_gives_each_part_one_id_and_counts_the_parts(client, server):
    """AddStream track: on a synthetic belt (parts sliding left 6 px a frame) detections carry their object's id from
    its second frame on (an object starts from a detection scoring --track-min-score, 0.5), the same id while the
    part crosses the frame (each id's box moves with the belt), yolov12_objects_total and ListStreams count the ids
    handed out (1..N); an untracked camera's detections carry no id, and the count goes with the camera."""
    url = "synthetic://tracked?fps=10&size=640x360&seed=2"  # parts the demo model is sure of (scores > 0.5)
    plain = results_of_a_camera(client, "plain", url, 10)
    assert any(fd.detections for fd in plain) and all(d.track_id == 0 for fd in plain for d in fd.detections)
    client.add_stream("tracked", url, track=True)
    try:
        assert client.stream("tracked").track
        got = first_results(client, "tracked", 40)
        path: dict[int, list[float]] = {}  # id -> its box centre's x, frame by frame
        for fd in got:
            for d in fd.detections:
                if d.track_id:
                    path.setdefault(d.track_id, []).append((d.x1 + d.x2) / 2)
        sure = [d.track_id for fd in got for d in fd.detections if d.score >= 0.5]  # --track-min-score 0.5
        assert sure and sum(map(bool, sure)) >= 0.7 * len(sure), sure  # all but a part's first frame
        assert sum(map(len, path.values())) >= 5 * len(path), path  # each id followed over frames
        long = {i: xs for i, xs in path.items() if len(xs) >= 5}
        assert long and all(xs[-1] < xs[0] for xs in long.values()), long  # carried left by the belt
        counted = re.findall(r'^yolov12_objects_total\{class="[^"]+",stream="tracked"\} (\S+)$', server.metrics(),
                             flags=re.M)
        assert set(path) <= set(range(1, int(sum(map(float, counted))) + 1)), (sorted(path), counted)
        # --evidence-dir: a picture of each object counted, its box drawn, and its record
        records = wait_until(lambda: [json.loads(p.read_text()) for p in (server.evidence / "tracked").glob("*.json")]
                             or None, 20, what="an evidence picture")
    finally:
        removed = client.remove_stream("tracked")
    assert removed.track and removed.objects >= max(len(path), sum(map(float, counted)))  # ListStreams counts too
    assert 'stream="tracked"' not in server.metrics()
    assert {r["track_id"] for r in records} <= set(range(1, removed.objects + 1)), records
    for r in records:
        picture = np.asarray(Image.open(server.evidence / "tracked" / r["picture"]))
        x1, y1, x2, y2 = (round(v) for v in r["box"])
        assert picture.shape == (360, 640, 3) and r["stream_id"] == "tracked" and 0 <= x1 < x2 <= 640, r
        assert r["model_version"] == client.server_info().engines[0].model_version, r  # which model found it
        edge = picture[(y1 + y2) // 2 - 2:(y1 + y2) // 2 + 3, max(x1, 1)].astype(int)  # its left edge, halfway down
        assert np.abs(edge - PALETTE[r["class_id"] % len(PALETTE)]).mean() < 50, (r, edge)
    assert re.search(r"^yolov12_evidence_pictures_total [1-9]", server.metrics(), flags=re.M)


def test_a_camera_whose_picture_is_frozen_is_reported_while_a_live_one_is_not(client, server):
    """Frames keep coming, so no stall, but a belt at a standstill (speed=0: the same frame each time, as an encoder
    stuck on one frame sends) is "frozen" in ListStreams and in yolov12_stream_picture_problem once that lasted
    --blind-after-s (1 s here); the moving belt beside it is not, nor a still one whose own blind_after_s is 0 (its
    ListStreams entry says so; the other's has none: the server's)."""
    client.add_stream("still", "synthetic://still?fps=10&size=320x180&speed=0")
    client.add_stream("moving", "synthetic://moving?fps=10&size=320x180")
    client.add_stream("parked", "synthetic://still?fps=10&size=320x180&speed=0", blind_after_s=0)
    try:
        wait_until(lambda: client.stream("still").picture_problem == "frozen", 20, what="the frozen picture reported")
        time.sleep(1)  # the parked one had as long as the still one, and a sample more
        text = server.metrics()
        assert client.stream("moving").picture_problem == "" and client.stream("parked").picture_problem == ""
        parked, still = client.stream("parked"), client.stream("still")
        assert parked.HasField("blind_after_s") and parked.blind_after_s == 0 and not still.HasField("blind_after_s")
        assert 'yolov12_stream_picture_problem{problem="frozen",stream="still"} 1.0' in text
        assert 'yolov12_stream_picture_problem{problem="frozen",stream="moving"} 0.0' in text
        assert client.stream("still").state == pb.STREAM_STATE_STREAMING  # it is not a stall: frames come
    finally:
        for sid in ("still", "moving", "parked"):
            client.remove_stream(sid)
    assert 'stream="still"' not in server.metrics()


def test_detections_are_counted_per_stream_and_class(client, server, photo):
    """yolov12_detections_total{stream, class}: a defect rate per line in Grafana. An image's detections add
    exactly what it was answered with; a camera's series appear with its detections and go with the camera."""
    from collections import Counter

    def counted(stream: str) -> Counter:
        pattern = rf'^yolov12_detections_total\{{class="([^"]+)",stream="{stream}"\}} (\S+)$'
        return Counter({m[0]: float(m[1]) for m in re.findall(pattern, server.metrics(), flags=re.M)})

    before = counted("_image")
    fd = client.detect_image(make_frame(photo, encoding="png"))
    answered = Counter(d.class_name for d in fd.detections)
    assert answered and counted("_image") - before == answered
    client.add_stream("counted", "synthetic://counted?fps=10&size=640x360")
    try:
        wait_until(lambda: sum(counted("counted").values()) > 0, 30, what="a camera's detections counted")
        assert set(counted("counted")) <= set(client.server_info().class_names)
    finally:
        client.remove_stream("counted")
    assert not counted("counted")


def test_generated_stubs_are_fresh(tmp_path: Path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools not installed")
    from yolov12_serve.proto import codegen

    floor = re.search(r'"grpcio>=([0-9.]+)"', (codegen.REPO_ROOT / "pyproject.toml").read_text()).group(1)
    assert floor == codegen.GRPC_FLOOR, "the stubs' grpcio version must be pyproject's floor"
    written = codegen.generate(tmp_path)
    assert {p.name for p in written} >= {"detector_pb2.py", "detector_pb2_grpc.py", "sparkplug_b_pb2.py"}
    for path in written:
        committed = codegen.PACKAGE_DIR / path.relative_to(tmp_path)
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run scripts/gen_protos"


def test_removing_a_pushed_stream_ends_its_detect_call(client, photo):
    sent_two = threading.Event()
    release = threading.Event()

    def gen():
        for i in range(50):
            yield make_frame(photo[:96, :128], "short-lived", i, encoding="png")
            if i == 1:
                sent_two.set()
                release.wait(20)

    call = client.detect(gen(), timeout=60)
    got = []

    def read():
        try:
            for r in call:
                got.append(r.frame_id)
        except grpc.RpcError as e:
            got.append(e.code())

    reader = threading.Thread(target=read)
    reader.start()
    assert sent_two.wait(20)
    wait_until(lambda: len(got) >= 2, 20, what="two results")
    assert client.remove_stream("short-lived").state == pb.STREAM_STATE_STOPPED
    reader.join(20)
    release.set()
    assert got[:2] == [0, 1] and got[-1] == grpc.StatusCode.ABORTED
