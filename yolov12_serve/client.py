"""`Client`: the Python way to use a yolov12-serve server (wraps the generated gRPC stubs; synchronous).

    from yolov12_serve.client import Client
    with Client("localhost:50051") as c:
        c.add_stream("line1-cam1", "rtsp://10.0.0.5/stream1")
        for fd in c.watch(["line1-cam1"]):          # FrameDetections, boxes in source pixels (sent in batches)
            print(fd.frame_id, [(d.class_name, d.score) for d in fd.detections])
        result = c.detect_image("part.jpg")          # one image: a path (JPEG, PNG, BMP, TIFF...), bytes, RGB array

    # a server with --tls-cert/--tls-key (and --tls-client-ca) and --auth-token-file (docs/security.md)
    with Client("detector.plant:50051", tls_ca="ca.crt", cert="me.crt", key="me.key", token=token) as c: ...
"""

from __future__ import annotations

import collections
import io
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from grpc.experimental import ChannelOptions
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .preprocess import check_eight_bit
from .proto import detector_pb2 as pb
from .proto import detector_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["Client", "FollowedWatch", "NewObjects", "Watch", "make_frame", "message_dict", "new_objects",
           "object_dict"]

log = logging.getLogger(__name__)

Pem = bytes | str | Path  # PEM data, or the path of a PEM file

_ENCODINGS = {"jpeg": pb.ENCODING_JPEG, "jpg": pb.ENCODING_JPEG, "png": pb.ENCODING_PNG, "rgb": pb.ENCODING_RGB24,
              "bgr": pb.ENCODING_BGR24}


def make_frame(image: np.ndarray | Image | bytes | str | Path, stream_id: str = "", frame_id: int = 0,
               encoding: str = "jpeg", quality: int = 90, capture_time_us: int = 0) -> pb.Frame:
    """A Frame from an RGB uint8 [H, W, 3] array, a mono [H, W] one or a PIL image (sent as `encoding`: jpeg, png,
    rgb, bgr), encoded bytes or a file. JPEG and PNG go as they are; another 8-bit image Pillow reads (BMP and TIFF
    from machine-vision cameras, WebP, GIF) goes as a lossless PNG, turned upright as its EXIF orientation says."""
    if isinstance(image, str | Path):
        image = Path(image).read_bytes()
    if isinstance(image, bytes):
        return pb.Frame(stream_id=stream_id, frame_id=frame_id, data=_jpeg_or_png(image),
                        encoding=pb.ENCODING_UNSPECIFIED, capture_time_us=capture_time_us)
    arr = _rgb_pixels(image)
    enc = _ENCODINGS.get(encoding.lower())
    if enc is None:
        raise ValueError(f"unknown encoding {encoding!r}: use one of {sorted(_ENCODINGS)}")
    h, w = arr.shape[:2]
    if enc == pb.ENCODING_RGB24:
        data = arr.tobytes()
    elif enc == pb.ENCODING_BGR24:
        data = np.ascontiguousarray(arr[..., ::-1]).tobytes()
    else:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG" if enc == pb.ENCODING_JPEG else "PNG", quality=quality)
        data = buf.getvalue()
    return pb.Frame(stream_id=stream_id, frame_id=frame_id, data=data, encoding=enc, width=w, height=h,
                    capture_time_us=capture_time_us)


def _rgb_pixels(image: np.ndarray | Image) -> np.ndarray:
    """An RGB uint8 [H, W, 3] array from an array of that kind, a mono one ([H, W] or [H, W, 1]: a machine-vision
    camera's) or a PIL image. Other dtypes are refused, not cast: a cast turns uint16 3000 into 184 and floats in
    0..1 into a black frame."""
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
        check_eight_bit(image)
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels (0..255), got {arr.dtype}: convert first, e.g. "
                         "(x * 255).round().astype(np.uint8) for floats in 0..1")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3 or 0 in arr.shape:
        raise ValueError(f"expected an RGB image [H, W, 3] (or mono [H, W]), got shape {list(arr.shape)}")
    return np.ascontiguousarray(arr)


def _jpeg_or_png(data: bytes) -> bytes:
    """`data` if it is JPEG or PNG (what the server decodes) or no image at all (the server says what is wrong);
    another image format re-encoded as PNG. ValueError for an image deeper than 8 bits a channel."""
    if data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n":
        return data
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            check_eight_bit(img)
            upright = ImageOps.exif_transpose(img).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError):
        return data  # not an image Pillow knows: sent as it is, and refused by the server with the reason
    buf = io.BytesIO()
    upright.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class Watch:
    """A watch call: iterate it for FrameDetections, `cancel()` it from any thread. By default it is a
    WatchDetectionBatches call (results arrive a batch per message, every few ms, and are handed out one by one:
    a watcher that keeps up gets every result), else a WatchDetections call (a message per result). `dropped`
    counts the results the server reported lost because this watcher fell behind (batched calls only), `messages`
    the batches received. It holds
    its channel: read in the caller's thread (the client's channel option), the call would otherwise end
    ("Channel deallocated") as soon as a `Client(...).watch()` left its client behind."""

    def __init__(self, call: grpc.Call, channel: grpc.Channel, batched: bool = False,
                 fallback: Callable[[], grpc.Call] | None = None) -> None:
        self.call = call
        self.batched = batched
        self.dropped = 0
        self.messages = 0
        self._channel = channel
        self._pending: Iterator[pb.FrameDetections] = iter(())
        self._fallback = fallback  # a server without WatchDetectionBatches (older): the per-result call instead
        self._started = False
        self._cancelled = False

    def __iter__(self) -> Watch:
        return self

    def __next__(self) -> pb.FrameDetections:
        if not self.batched:
            return next(self.call)
        while True:
            fd = next(self._pending, None)
            if fd is not None and not self._cancelled:
                return fd
            try:
                batch = next(self.call)
            except grpc.RpcError as e:
                if self._started or self._fallback is None or e.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self.call, self.batched = self._fallback(), False
                return next(self.call)
            self._started = True
            self.messages += 1
            self.dropped += batch.dropped
            self._pending = iter(batch.results)

    def cancel(self) -> bool:
        """Stop the stream: the reader gets a CANCELLED RpcError (or StopIteration if it had ended), also where
        results of the last batch were still to be handed out."""
        self._cancelled = True
        self._pending = iter(())
        return self.call.cancel()

    def __getattr__(self, name: str) -> object:
        """The rest of grpc's call (`code()`, `details()`, `add_done_callback`, ...), as watch() returned before."""
        return getattr(self.call, name)


def _check_types(call: str, **given: tuple[Any, type | tuple[type, ...]]) -> None:
    """TypeError naming the argument and the type it takes (protobuf's says neither: "must be real number, not
    str")."""
    for name, (value, kind) in given.items():
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is Real):
            wanted = " or ".join(k.__name__ if k is not type(None) else "None" for k in
                                 (kind if isinstance(kind, tuple) else (kind,)))
            raise TypeError(f"{call}: {name} takes {wanted.replace('Real', 'a number')}, got {value!r}")


def _check_timeout(call: str, timeout: Any, no_deadline: bool = True) -> None:
    """TypeError / ValueError unless `timeout` is seconds above 0 (or None, no deadline, where `no_deadline`): "5"
    failed only at the first call ("unsupported operand"), and 0, a negative number or inf ended every call at once."""
    if timeout is None and no_deadline:
        return
    what = "a number of seconds above 0" + (" or None (no deadline)" if no_deadline else "")
    if isinstance(timeout, bool) or not isinstance(timeout, Real):
        raise TypeError(f"{call}: timeout takes {what}, such as timeout=10, got {timeout!r}")
    if not 0 < timeout < math.inf:
        raise ValueError(f"{call}: timeout must be {what}, such as timeout=10, got {timeout!r}")


class _PushAnswers:
    """A Detect call's answers; when the frames given could not all be sent, the caller's own error instead of the
    UNKNOWN status gRPC ends the call with. The rest of the call (`cancel()`, `code()`, ...) as grpc's."""

    def __init__(self, call: Any, failed: list[Exception]) -> None:
        self.call, self._failed = call, failed

    def __iter__(self) -> _PushAnswers:
        return self

    def __next__(self) -> pb.FrameDetections:
        try:
            return next(self.call)
        except grpc.RpcError:
            if self._failed:
                raise self._failed[0] from None
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.call, name)


class FollowedWatch:
    """A watch that outlives server restarts (`Client.watch(..., follow=True)`): when the call ends (the server drained
    for an upgrade) or the server cannot be reached (UNAVAILABLE: gone, restarting, still loading), it tries again,
    0.5 s after the first failure and up to every `retry_cap_s`, until the server answers; any other status
    (NOT_FOUND, UNAUTHENTICATED, ...) ends it as it would a plain watch. `on_gap(text)` hears of each gap and each
    resumption (default: a warning on this module's logger); `gaps` counts them. Results published while no call was
    open are not seen, and a camera restored after a restart numbers its frames from 0 again. `timeout` bounds the
    whole watch: when it is up the reader gets StopIteration, connected or not (a plain watch's call ends in
    DEADLINE_EXCEEDED); `cancel()` ends it from any thread, during a wait too (StopIteration as well)."""

    def __init__(self, open_call: Callable[[float | None], Watch], timeout: float | None = None,
                 on_gap: Callable[[str], None] | None = None, retry_cap_s: float = 5.0) -> None:
        _check_timeout("FollowedWatch", timeout)
        self._open_call = open_call
        self._end = None if timeout is None else time.monotonic() + timeout
        self._on_gap = on_gap or (lambda text: log.warning("watch: %s", text))
        self._retry_cap_s = retry_cap_s
        self._stop = threading.Event()
        self._watch: Watch | None = None
        self._in_gap = False
        self.gaps = 0
        self.dropped = 0  # results the server reported lost because this watcher fell behind, over every call

    def __iter__(self) -> FollowedWatch:
        return self

    def __next__(self) -> pb.FrameDetections:
        delay = 0.5
        while True:
            if self._stop.is_set():
                raise StopIteration
            remaining = None if self._end is None else self._end - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise StopIteration
            if self._watch is None:
                self._watch = self._open_call(remaining)
                if self._stop.is_set():  # cancel() ran meanwhile and saw no call to cancel
                    self._watch.cancel()
            before = self._watch.dropped
            try:
                fd = next(self._watch)
            except StopIteration:
                why = "the server ended the call (shutting down or restarting)"
            except grpc.RpcError as e:
                if (e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and self._end is not None
                        and time.monotonic() >= self._end - 0.05):  # the watch's own time is up: ended as below
                    raise StopIteration from None
                if self._stop.is_set() or e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                why = f"UNAVAILABLE: {e.details()}"
            else:
                self.dropped += self._watch.dropped - before
                if self._in_gap:
                    self._in_gap = False
                    self._on_gap("watching again")
                return fd
            self._watch = None
            if self._stop.is_set():  # cancelled: the call's end is no gap
                raise StopIteration
            if not self._in_gap:
                self._in_gap = True
                self.gaps += 1
                self._on_gap(f"watch interrupted ({why}); trying again until the server is back")
            self._stop.wait(delay)
            delay = min(2 * delay, self._retry_cap_s)

    def cancel(self) -> bool:
        """Stop following: the open call is cancelled, a wait between tries ends at once."""
        self._stop.set()
        watch = self._watch
        return watch.cancel() if watch is not None else True


def lacks_port(target: str) -> bool:
    """Whether a target names a host but no port ("localhost", "[::1]", "dns:///host"): gRPC then goes to 443, where
    only a TLS gateway may listen (unix:, ipv4:, ipv6: and other gRPC schemes are left to gRPC)."""
    if target.startswith("dns:"):
        target = target[4:]
        if target.startswith("//"):  # dns://[AUTHORITY]/HOST[:PORT]
            target = target[2:].split("/", 1)[-1]
    elif target.split(":", 1)[0] in ("unix", "unix-abstract", "ipv4", "ipv6", "vsock"):
        return False
    if target.startswith("["):  # [IPv6]:PORT
        return not target.rpartition("]")[2][1:]
    _, colon, port = target.rpartition(":")
    return not colon or not port


def _read_pem(value: Pem | None, what: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the {what} {value}: {e.strerror or e}") from None


class _Details(collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials",
                                                   "wait_for_ready", "compression")), grpc.ClientCallDetails):
    pass


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer TOKEN` to every call (plaintext channels too, which call credentials refuse)."""

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, d: grpc.ClientCallDetails) -> _Details:
        return _Details(d.method, d.timeout, [*(d.metadata or ()), self._entry], d.credentials,
                        getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def new_objects(results: Iterable[pb.FrameDetections]) -> Iterator[tuple[pb.FrameDetections, pb.Detection]]:
    """(result, detection) once per object of tracked cameras (AddStream track): the first result in `results` (a
    watch) that carries its track id. What a system that records each defect once wants:
    `for fd, d in new_objects(client.watch(follow=True)): record(fd.stream_id, d.track_id, d.class_name, ...)`.
    A camera whose frame numbers start again (the server restarted, the camera was added again) numbers its
    objects from 1 again: it is followed afresh."""
    objects = NewObjects()
    for fd in results:
        for d in objects.new(fd):
            yield fd, d


class NewObjects:
    """The track ids seen per camera: `new(fd)` gives the detections of `fd` whose object was not seen before."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, set[int]]] = {}  # camera -> (latest frame id, the ids seen)

    def new(self, fd: pb.FrameDetections) -> list[pb.Detection]:
        last, ids = self._seen.get(fd.stream_id, (-1, set()))
        if fd.frame_id < last:  # its frame numbers started again: followed afresh
            ids = set()
        self._seen[fd.stream_id] = (fd.frame_id, ids)
        found = []
        for d in fd.detections:
            if d.track_id and d.track_id not in ids:
                ids.add(d.track_id)
                found.append(d)
        if len(ids) > 8192:  # a long watch: ids far behind the newest cannot come back (forgotten after 1 s)
            keep = sorted(ids)[-4096:]
            ids.clear()
            ids.update(keep)
        return found

    def forget(self, stream_id: str) -> None:
        """A camera gone: its ids are not kept."""
        self._seen.pop(stream_id, None)


def message_dict(message: Any) -> dict[str, Any]:
    """A protobuf message as a JSON-ready dict with the .proto's field names, every field present
    (`yolov12-ctl ... --json`, MQTT): a result is `message_dict(fd)`."""
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def object_dict(fd: pb.FrameDetections, d: pb.Detection) -> dict[str, Any]:
    """An object when first seen as a JSON-ready dict: camera, frame, capture time (and as UTC text) and the
    detection (`yolov12-ctl watch --objects --json`, MQTT objects). Its ids are numbers, as in the evidence record
    (evidence.py): proto3's JSON writes 64-bit fields as strings, which gave one record `"frame_id": 7` beside
    `"track_id": "12"` (an MES parser keyed on the id then met both types)."""
    at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(fd.capture_time_us / 1e6)) + \
        f".{fd.capture_time_us // 1000 % 1000:03d}Z"
    return {"stream_id": fd.stream_id, "frame_id": fd.frame_id, "capture_time_us": fd.capture_time_us, "time": at,
            **message_dict(d), "track_id": d.track_id}



def _flat(zone: Sequence[tuple[float, float]] | Sequence[float]) -> list[float]:
    """A zone's corners as the wire's x0, y0, x1, y1, ... (given as pairs, or already flat)."""
    return [float(c) for point in zone for c in (point if isinstance(point, Sequence | np.ndarray) else (point,))]


class Client:
    """A connection to one server. Methods raise grpc.RpcError with the server's status code and message.
    `target` is HOST:PORT (or a gRPC target such as unix:PATH); the port may be left out over TLS only (443, a
    gateway's: gRPC's default), a plaintext target without one is a ValueError. `timeout` bounds each call (None:
    no deadline).

    TLS (docs/security.md): `tls_ca` is the CA that signed the server's certificate (PEM bytes or a file; None with
    `tls=True`: the system's CAs); `cert` and `key` are this client's certificate and key for a server with
    --tls-client-ca (mutual TLS); `server_name` checks the server's certificate for that name instead of the
    target's host. Any of them turns TLS on. `token` is sent as `authorization: Bearer TOKEN` on every call."""

    def __init__(self, target: str = "localhost:50051", timeout: float | None = 10.0,
                 max_message_bytes: int = 32 * 1024 * 1024, channel: grpc.Channel | None = None, *,
                 tls: bool | None = None, tls_ca: Pem | None = None, cert: Pem | None = None, key: Pem | None = None,
                 token: str | None = None, server_name: str | None = None) -> None:
        _check_timeout("Client", timeout)
        self.timeout = timeout
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # watch() reads each message in the caller's thread instead of waking it from the channel's own
            # thread: one thread wake-up less per result (0.53 -> 0.41 ms of client CPU per message here)
            (ChannelOptions.SingleThreadedUnaryStream, 1)]
        if channel is None:
            if not isinstance(target, str) or not target or target.split("://", 1)[0] in ("http", "https", "grpc"):
                raise ValueError(f"target {target!r}: expected HOST:PORT such as localhost:50051 (no http://; TLS: "
                                 "tls_ca=...)")  # else gRPC says "Misformatted domain name" at the first call
            channel = self._channel(target, options, tls, tls_ca, cert, key, server_name)
        self.channel = grpc.intercept_channel(channel, _BearerToken(token)) if token else channel
        self.stub = pb_grpc.DetectorStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    @staticmethod
    def _channel(target: str, options: list, tls: bool | None, tls_ca: Pem | None, cert: Pem | None,
                 key: Pem | None, server_name: str | None) -> grpc.Channel:
        if (cert is None) != (key is None):
            raise ValueError("cert and key go together: give both (mutual TLS) or neither")
        secure = tls if tls is not None else any(v is not None for v in (tls_ca, cert, server_name))
        if not secure:
            if tls_ca is not None or cert is not None:
                raise ValueError("tls=False with tls_ca / cert / key: those are TLS settings")
            if lacks_port(target):  # gRPC's default, 443, is no yolov12-serve's in plaintext
                raise ValueError(f"target {target!r} has no port: add it, such as {target}:50051 (plaintext would go "
                                 "to gRPC's default 443; a TLS gateway there: tls=True)")
            return grpc.insecure_channel(target, options=options)
        key_pem = _read_pem(key, "client key")
        if key_pem is not None and b"ENCRYPTED" in key_pem:  # gRPC reads no passphrase: "Invalid private key"
            raise ValueError("the client key is encrypted: give it unencrypted (openssl pkey -in KEY -out KEY.pem)")
        creds = grpc.ssl_channel_credentials(_read_pem(tls_ca, "CA certificate"), key_pem,
                                             _read_pem(cert, "client certificate"))
        if server_name:
            options = [*options, ("grpc.ssl_target_name_override", server_name)]
        return grpc.secure_channel(target, creds, options=options)

    def add_stream(self, stream_id: str, url: str, max_fps: float = 0.0, min_score: float = 0.0,
                   classes: Sequence[str] = (), zone: Sequence[tuple[float, float]] = (),
                   blind_after_s: float | None = None, track: bool = False,
                   class_min_scores: Mapping[str, float] | None = None) -> pb.StreamInfo:
        """Have the server pull a camera (returns at once, state CONNECTING). Publish only its detections scoring at
        least `min_score` (0: all the engine returns; `class_min_scores` gives some classes a score of their own,
        e.g. {"dent": 0.3}), of `classes` (names; empty: all), whose box centre lies in
        `zone` (a polygon of (x, y) fractions of the frame, e.g. [(0, .3), (1, .3), (1, .8), (0, .8)], or the same
        numbers flat; empty: all). `blind_after_s`: report its picture blank or frozen after this long (0: never;
        None: the server's --blind-after-s). `track`: follow each object, its detections carrying one `track_id`
        from frame to frame (0 for one seen once so far), and count objects in yolov12_objects_total."""
        url = str(url) if isinstance(url, Path) else url  # a video file (the server's --allow-files)
        _check_types("add_stream", stream_id=(stream_id, str), url=(url, str), max_fps=(max_fps, Real),
                     min_score=(min_score, Real), blind_after_s=(blind_after_s, (Real, type(None))),
                     track=(track, bool))
        classes = [classes] if isinstance(classes, str) else list(classes)
        if not all(isinstance(c, str) for c in classes):
            raise TypeError(f"add_stream: classes are the model's class names (str), got {classes!r}")
        # a list here would reach dict() as "dictionary update sequence element #0 has length 4; 2 is required"
        if class_min_scores is not None and not isinstance(class_min_scores, Mapping):
            raise TypeError(f"add_stream: class_min_scores maps class names (str) to scores, e.g. {{'dent': 0.3}}, "
                            f"got {class_min_scores!r}")
        try:
            corners = _flat(zone) if not isinstance(zone, str | bytes) else None
        except (TypeError, ValueError):
            corners = None
        if corners is None:  # a string's characters would be read as numbers: "could not convert string to float"
            raise TypeError(f"add_stream: zone takes (x, y) pairs or the same numbers flat, e.g. [(0, .3), (1, .3), "
                            f"(1, .8), (0, .8)], got {zone!r}")
        scores = dict(class_min_scores or {})
        if not all(isinstance(k, str) and isinstance(v, Real) for k, v in scores.items()):
            raise TypeError(f"add_stream: class_min_scores maps class names (str) to scores, got {scores!r}")
        request = pb.AddStreamRequest(stream_id=stream_id, url=url, max_fps=max_fps, min_score=min_score,
                                      classes=classes, zone=corners, blind_after_s=blind_after_s, track=track,
                                      class_min_scores=scores)
        return self.stub.AddStream(request, timeout=self.timeout)

    def remove_stream(self, stream_id: str) -> pb.StreamInfo:
        """Stop a stream; returns its last state."""
        return self.stub.RemoveStream(pb.RemoveStreamRequest(stream_id=stream_id), timeout=self.timeout).stream

    def list_streams(self) -> list[pb.StreamInfo]:
        """Every stream with state, device, fps, latency and last error."""
        return list(self.stub.ListStreams(pb.ListStreamsRequest(), timeout=self.timeout).streams)

    def stream(self, stream_id: str) -> pb.StreamInfo | None:
        """One stream's info, or None when it is not registered."""
        return next((s for s in self.list_streams() if s.stream_id == stream_id), None)

    def watch(self, stream_ids: Iterable[str] = (), timeout: float | None = None, batched: bool = True,
              max_delay_ms: int = 0, follow: bool = False,
              on_gap: Callable[[str], None] | None = None) -> Watch | FollowedWatch:
        """Detections as published (all streams when `stream_ids` is empty), one FrameDetections at a time;
        `.cancel()` on the result stops it. `batched` (the default): they travel in WatchDetectionBatches
        messages, every `max_delay_ms` at most (0: the server's default, 5 ms), so a watcher that keeps up gets
        every result at thousands a second (a server without that call is watched per result instead);
        `batched=False`: one WatchDetections message per result (a slow watcher loses more). `follow`: go on
        through server restarts and outages (`FollowedWatch`; `on_gap` hears of each gap). One id may be given
        alone (a string is not read as a list of one-letter ids)."""
        _check_timeout("watch", timeout)
        if isinstance(stream_ids, str):
            stream_ids = [stream_ids]
        if follow:
            return FollowedWatch(lambda left: self.watch(stream_ids, left, batched, max_delay_ms), timeout, on_gap)
        ids = list(stream_ids)

        def per_result() -> grpc.Call:
            return self.stub.WatchDetections(pb.WatchDetectionsRequest(stream_ids=ids), timeout=timeout)

        if not batched:
            return Watch(per_result(), self.channel)
        request = pb.WatchDetectionBatchesRequest(stream_ids=ids, max_delay_ms=max_delay_ms)
        return Watch(self.stub.WatchDetectionBatches(request, timeout=timeout), self.channel, batched=True,
                     fallback=per_result)

    def detect(self, frames: Iterable[pb.Frame | np.ndarray], stream_id: str = "",
               timeout: float | None = None) -> Iterator[pb.FrameDetections]:
        """Push mode: frames (Frame messages or RGB arrays, sent as JPEG) in, detections out in the same order. A
        frame that cannot be made into a message (make_frame's ValueError) is raised as itself when reading the
        answers, not as gRPC's UNKNOWN "Exception iterating requests!"."""
        _check_timeout("detect", timeout)
        failed: list[Exception] = []

        def messages() -> Iterator[pb.Frame]:
            try:
                for i, f in enumerate(frames):
                    yield f if isinstance(f, pb.Frame) else make_frame(f, stream_id, i,
                                                                       capture_time_us=time.time_ns() // 1000)
            except Exception as e:
                failed.append(e)
                raise

        return _PushAnswers(self.stub.Detect(messages(), timeout=timeout), failed)

    def detect_image(self, image: np.ndarray | Image | bytes | str | Path | pb.Frame, stream_id: str = "",
                     frame_id: int = 0) -> pb.FrameDetections:
        """Detections for one image (a path or bytes of JPEG, PNG, BMP, TIFF..., an RGB or mono uint8 array, a PIL
        image, or a Frame)."""
        frame = image if isinstance(image, pb.Frame) else make_frame(image, stream_id, frame_id)
        return self.stub.DetectImage(frame, timeout=self.timeout)

    def snapshot(self, stream_id: str) -> pb.Snapshot:
        """A camera's next picture, full size: `.jpeg` (bytes), `.width`, `.height` (UNAVAILABLE when it sends no
        frame within a few seconds). `Image.open(io.BytesIO(s.jpeg))` reads it."""
        timeout = None if self.timeout is None else max(self.timeout, 15.0)  # the server waits up to 5 s for a frame
        return self.stub.GetSnapshot(pb.GetSnapshotRequest(stream_id=stream_id), timeout=timeout)

    def server_info(self) -> pb.ServerInfo:
        """Engines, devices, class names, input size and SLO."""
        return self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=self.timeout)

    def reload_engines(self, engines: Iterable[str | Path] | str | Path = (),
                       timeout: float | None = 300.0) -> list[pb.EngineInfo]:
        """Swap in the engine files (again: empty `engines`), streams flowing; returns what runs now. A file that
        cannot serve raises FAILED_PRECONDITION and the running engines stay. One file may be given alone (a string
        is not read as a list of one-letter paths), as str or Path."""
        _check_timeout("reload_engines", timeout)
        if isinstance(engines, str | Path):
            engines = [engines]
        request = pb.ReloadEnginesRequest(engines=[str(e) for e in engines])
        return list(self.stub.ReloadEngines(request, timeout=timeout).engines)

    def health(self, service: str = "") -> str:
        """'SERVING', 'NOT_SERVING', ... from grpc.health.v1 ('' = the whole server)."""
        resp = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server says SERVING (engines loaded); TimeoutError otherwise."""
        _check_timeout("wait_ready", timeout, no_deadline=False)
        end = time.monotonic() + timeout
        last = ""
        while time.monotonic() < end:
            try:
                last = self.health()
                if last == "SERVING":
                    return
            except grpc.RpcError as e:
                last = str(e.code())
            time.sleep(0.1)
        raise TimeoutError(f"server not SERVING after {timeout:.0f} s (last: {last})")

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
