"""Hostile input, property-based (hypothesis): every RPC and every field of the real server (subprocess, loopback,
tokens on) gets generated junk: URLs of every shape (brackets, ports out of range, control characters,
percent-encoding, user-info, metadata hosts), empty, very long and non-ASCII ids, non-finite rates, random bytes
as images, declared sizes that would allocate gigabytes, unknown encodings, bytes that are no protobuf at all,
tokens and roles. Each call must end OK or with a status that names the client's mistake (INVALID_ARGUMENT,
NOT_FOUND, ALREADY_EXISTS, RESOURCE_EXHAUSTED, UNAUTHENTICATED, PERMISSION_DENIED), never UNKNOWN or INTERNAL, and
the server must stay SERVING. CI runs the 'ci' profile (tests/conftest.py: 60 examples a test, about a minute);
`pytest tests/test_fuzz.py --hypothesis-profile long` runs 1500 a test."""

from __future__ import annotations

import io
import math
import struct
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image
from test_server_harness import ServerProcess

from yolov12_serve.client import Client
from yolov12_serve.proto import detector_pb2 as pb

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis (test extra) is not installed")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.timeout(600)

S = grpc.StatusCode
CLIENT_MISTAKES = {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND, S.ALREADY_EXISTS, S.RESOURCE_EXHAUSTED, S.UNAUTHENTICATED,
                   S.PERMISSION_DENIED}
OPERATOR = "fuzz-operator-" + "1" * 20
VIEWER = "fuzz-viewer-" + "2" * 20
DETECTOR = "/yolov12.v1.Detector/"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tokens = tmp_path_factory.mktemp("fuzz") / "tokens"
    tokens.write_text(f"{OPERATOR} operator\n{VIEWER} viewer\n")
    tokens.chmod(0o600)
    srv = ServerProcess("--auth-token-file", str(tokens), "--max-streams", "6", "--max-message-mb", "2",
                        "--allow-hosts", "127.0.0.0/8,::1,10.0.0.0/8,*.plant", "--backoff-cap-s", "1",
                        "--metrics-port", "-1")
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def op(server):
    c = Client(server.address, timeout=20, token=OPERATOR)
    c.wait_ready(60)
    yield c
    c.close()


@pytest.fixture(autouse=True)
def still_serving(request, server):
    """After each test: the server runs, says SERVING and holds no stream the test added."""
    yield
    if "op" not in request.fixturenames:
        return
    op = request.getfixturevalue("op")
    clean(op)
    assert server.proc.poll() is None, server.log()
    assert op.health() == "SERVING"
    assert "Traceback" not in server.log(), server.log()


def clean(op: Client) -> None:
    for s in op.list_streams():
        op.remove_stream(s.stream_id)


def outcome(fn) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return S.OK, ""


def assert_client_mistake(code: grpc.StatusCode, details: str, what: object) -> None:
    assert code in CLIENT_MISTAKES, f"{what!r} -> {code.name}: {details}"
    if code != S.OK:
        assert details, f"{what!r} -> {code.name} without a message"


# ------------------------------------------------------------------------------------------------ strategies
printable = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
ids = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=printable, min_size=1, max_size=140),
    st.sampled_from(["", " ", "a" * 129, "a" * 128, "cam\x00", "kamera-\u00fc", "\u202ecam", "../../etc", "cam 1"]),
)
hosts = st.one_of(
    st.sampled_from(["127.0.0.1", "localhost", "[::1]", "[::1", "::1]", "[fe80::1%25eth0]", "169.254.169.254",
                     "2852039166", "0xa9fea9fe", "[::ffff:169.254.169.254]", "[fd00:ec2::254]",
                     "metadata.google.internal",
                     "10.1.2.3", "cam.plant", "0.0.0.0", "", "h\x00st", "h%00st", "h%2F", "xn--", "\uff20evil",
                     "[", "]", "[[::1]]", "user@host", "a" * 300]),
    st.ip_addresses().map(lambda a: f"[{a}]" if a.version == 6 else str(a)),
    st.from_regex(r"[a-z0-9.*-]{1,30}", fullmatch=True),
    st.text(max_size=20),
)
ports = st.one_of(st.just(""), st.integers(-5, 70_000).map(lambda p: f":{p}"), st.text(max_size=6).map(":{}".format))
userinfo = st.one_of(st.just(""), st.tuples(st.text(max_size=10), st.text(max_size=10)).map("{0[0]}:{0[1]}@".format),
                     st.text(max_size=10).map("{}@".format))
paths = st.one_of(st.just(""), st.text(max_size=40),
                  st.from_regex(r"(/[A-Za-z0-9%._~-]{0,10}){0,4}", fullmatch=True).filter(lambda p: len(p) < 60))
queries = st.one_of(st.just(""), st.text(max_size=30).map("?{}".format),
                    st.sampled_from(["?token=abc", "?fps=5&size=99999x1", "?size=x", "#frag", "?%zz=1"]))
schemes = st.sampled_from(["rtsp", "rtsps", "RTSP", "synthetic", "file", "http", "ftp", "", "rtsp:", "javascript",
                           "rtsp\x00", "r\u00fctsp"])
urls = st.one_of(st.builds("{}://{}{}{}{}{}".format, schemes, userinfo, hosts, ports, paths, queries),
                 st.text(max_size=200), st.binary(max_size=60).map(lambda b: b.decode("latin-1")))
rates = st.one_of(st.floats(width=32), st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0, 1e30, 5.0]))


def png_header_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header says width x height (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def _small_image(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((24, 32, 3), 90, np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


JPEG, PNG = _small_image("JPEG"), _small_image("PNG")
image_data = st.one_of(
    st.binary(max_size=3000),
    st.builds(png_header_claiming, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)),
    st.integers(1, len(JPEG) - 1).map(lambda n: JPEG[:n]),  # truncated
    st.integers(1, len(PNG) - 1).map(lambda n: PNG[:n]),
    st.builds(lambda head, tail: head + tail, st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a"]),
              st.binary(max_size=200)),
    st.just(JPEG), st.just(PNG), st.just(b""),
)
encodings = st.one_of(st.sampled_from([0, 1, 2, 3, 4]), st.integers(-(2**31), 2**31 - 1))
sizes = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, 24, 32, 16384, 16385, 65535, 2**31 - 1]))
frames = st.builds(pb.Frame, stream_id=st.just(""), frame_id=st.integers(0, 2**64 - 1), data=image_data,
                   encoding=encodings, width=sizes, height=sizes, capture_time_us=st.integers(-(2**63), 2**63 - 1))


# ------------------------------------------------------------------------------------------------ the properties
@given(stream_id=ids, url=urls, max_fps=rates)
def test_add_stream_answers_every_id_url_and_rate(op, stream_id, url, max_fps):
    code, details = outcome(lambda: op.add_stream(stream_id, url, max_fps))
    assert_client_mistake(code, details, (stream_id, url, max_fps))
    if code == S.OK:
        op.remove_stream(stream_id)


@given(stream_ids=st.lists(ids, min_size=1, max_size=5))
def test_unknown_streams_are_not_found_or_invalid(op, stream_ids):
    for sid in stream_ids:
        assert_client_mistake(*outcome(lambda sid=sid: op.remove_stream(sid)), sid)
    code, details = outcome(lambda: next(iter(op.watch(stream_ids, timeout=20))))
    assert code in (S.NOT_FOUND, S.INVALID_ARGUMENT), (stream_ids, code, details)


@given(frame=frames)
def test_detect_image_answers_every_frame(op, frame):
    code, details = outcome(lambda: op.detect_image(frame))
    assert_client_mistake(code, details, (frame.encoding, frame.width, frame.height, frame.data[:40]))


@given(batch=st.lists(frames, min_size=1, max_size=3), stream_id=st.one_of(st.just(""), ids))
def test_detect_answers_every_pushed_frame(op, batch, stream_id):
    for f in batch:
        f.stream_id = stream_id
    code, details = outcome(lambda: list(op.detect(iter(batch), timeout=30)))
    assert_client_mistake(code, details, [(f.encoding, f.width, f.height, f.data[:20]) for f in batch])


METHODS = {  # method -> (request streamed, response streamed)
    "AddStream": (False, False), "RemoveStream": (False, False), "ListStreams": (False, False),
    "GetServerInfo": (False, False), "DetectImage": (False, False), "WatchDetections": (False, True),
    "WatchDetectionBatches": (False, True), "Detect": (True, True),
}
WATCH_REQUEST = {"WatchDetections": pb.WatchDetectionsRequest, "WatchDetectionBatches": pb.WatchDetectionBatchesRequest}


@given(method=st.sampled_from(sorted(METHODS)), payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=3))
def test_bytes_that_are_no_request_are_invalid_argument(op, method, payloads):
    """Wire-format junk and strings that are not UTF-8 (grpc itself answered those UNKNOWN)."""
    streamed_in, streamed_out = METHODS[method]
    channel, name = op.channel, DETECTOR + method
    if streamed_in:
        call = lambda: list(channel.stream_stream(name)(iter(payloads), timeout=20))  # noqa: E731
    elif streamed_out:
        call = lambda: next(iter(channel.unary_stream(name)(payloads[0], timeout=5)))  # noqa: E731
    else:
        call = lambda: channel.unary_unary(name)(payloads[0], timeout=20)  # noqa: E731
    code, details = outcome(call)
    if code == S.DEADLINE_EXCEEDED and method in WATCH_REQUEST:  # a valid request to watch every stream: it
        assert not WATCH_REQUEST[method].FromString(payloads[0]).stream_ids  # waits, as it should, for results
        return
    assert_client_mistake(code, details, (method, payloads))
    clean(op)  # bytes that happened to be a valid AddStreamRequest


def test_bytes_that_are_not_utf8_are_invalid_argument_not_unknown(op):
    """The examples the property above may or may not draw: a string field holding bad UTF-8, corrupt wire format."""
    for payload in (b"\x0a\x02\xff\xfe", b"\xff\xff\xff", b"\x0a\xff\x01"):
        code, details = outcome(lambda p=payload: op.channel.unary_unary(DETECTOR + "AddStream")(p, timeout=20))
        assert code == S.INVALID_ARGUMENT and "cannot be parsed" in details, (payload, code, details)


ROLE_OF = {"AddStream": "operator", "RemoveStream": "operator", "ListStreams": "viewer", "GetServerInfo": "viewer",
           "WatchDetections": "viewer", "WatchDetectionBatches": "viewer", "DetectImage": "viewer",
           "ReloadEngines": "operator"}


@given(token=st.one_of(st.sampled_from([None, VIEWER, OPERATOR, VIEWER + "x", OPERATOR[:-1], ""]),
                       st.text(alphabet=printable, max_size=60)),
       scheme=st.sampled_from(["Bearer", "bearer", "Basic", "Token", ""]), method=st.sampled_from(sorted(ROLE_OF)))
def test_tokens_and_roles(server, token, scheme, method):
    metadata = None if token is None else [("authorization", f"{scheme} {token}".strip())]
    channel = grpc.insecure_channel(server.address)
    try:
        code, details = outcome(lambda: channel.unary_unary(DETECTOR + method)(b"", timeout=20, metadata=metadata))
    finally:
        channel.close()
    role = {VIEWER: "viewer", OPERATOR: "operator"}.get(token) if scheme.lower() == "bearer" else None
    if role is None:
        assert code == S.UNAUTHENTICATED, (token, scheme, method, code, details)
    elif role == "viewer" and ROLE_OF[method] == "operator":
        assert code == S.PERMISSION_DENIED, (token, method, code, details)
    else:
        assert code not in (S.UNAUTHENTICATED, S.PERMISSION_DENIED, S.UNKNOWN, S.INTERNAL), (method, code, details)
