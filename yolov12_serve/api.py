"""The gRPC API (grpc.aio): thin routes over `ServerCore`, errors mapped to status codes, plus health and reflection.

Status codes: InvalidArgumentError -> INVALID_ARGUMENT (bad id, URL, image; also a request that cannot be parsed:
guard.py), PermissionDeniedError -> PERMISSION_DENIED (a camera host outside --allow-hosts), StreamExistsError ->
ALREADY_EXISTS, StreamNotFoundError -> NOT_FOUND, ResourceExhaustedError -> RESOURCE_EXHAUSTED (stream
limit, snapshots waiting; oversized messages are refused by gRPC itself with the same code), UnavailableError ->
UNAVAILABLE (draining, loading, no healthy device, a camera that sent no frame), AbortedError -> ABORTED (a pushed
stream removed meanwhile), WrongShardError -> FAILED_PRECONDITION (a camera another replica owns, --shard-count > 1:
the message names it), a failed engine run (EngineRunError) and anything unexpected -> INTERNAL. The service's own
errors carry ANSWERED_BY_SERVER in their trailers (`abort`). `grpc.health.v1.Health` says SERVING once the engines
are loaded and NOT_SERVING while draining or when no engine works; each device has its own entry,
`yolov12.v1.Detector/DEVICE`, NOT_SERVING while that device is out of service.
"""

# ruff: noqa: N802 - gRPC method names are the proto's (AddStream, ...)
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import messages
from .calllimits import PerClientCallLimit, default_per_client, peer_text
from .config import StreamSpec, quote_id, validate_stream_id
from .core import SNAPSHOT_WAIT_S, ServerCore
from .errors import (
    ANSWERED_BY_SERVER,
    AbortedError,
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ServerError,
    StreamExistsError,
    StreamNotFoundError,
    UnavailableError,
    WrongShardError,
)
from .filters import zone_from_flat
from .frames import FrameResult, now
from .healthport import start_health_port
from .ports import check_bindable
from .proto import detector_pb2 as pb
from .proto import detector_pb2_grpc as pb_grpc
from .pushcall import PushCall
from .security import Security
from .urls import redact_text

__all__ = ["BATCH_LIMIT", "SERVICE_NAME", "SNAPSHOT_WAITS", "DetectorService", "GrpcServer",
           "abort", "create_server", "device_health_name", "status_code"]

log = logging.getLogger(__name__)

BATCH_LIMIT = 1024  # results per DetectionBatch at most (and half of --max-message-mb in bytes)
SNAPSHOT_WAITS = 8  # GetSnapshot calls waiting for a frame at once
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Detector"].full_name  # yolov12.v1.Detector

_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (StreamExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (StreamNotFoundError, grpc.StatusCode.NOT_FOUND),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (AbortedError, grpc.StatusCode.ABORTED),
    (WrongShardError, grpc.StatusCode.FAILED_PRECONDITION),
    (FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
]


def _weigh(result: FrameResult) -> int:
    """An upper bound of a result's bytes in a DetectionBatch (a batch stays within half the message limit)."""
    return 96 + 64 * len(result.detections) + len(result.error or "")


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End the call with `code`, marked as the server's own answer (ANSWERED_BY_SERVER in its trailers): a client
    tells "the camera sent no frame" (UNAVAILABLE from here) from "the server cannot be reached" (from gRPC)."""
    await context.abort(code, details, trailing_metadata=ANSWERED_BY_SERVER)


def device_health_name(device: str) -> str:
    """The grpc.health.v1 service name under which one device's health is reported."""
    return f"{SERVICE_NAME}/{device}"


def status_code(error: Exception) -> grpc.StatusCode:
    """The gRPC status for a core error (INTERNAL for anything unexpected)."""
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _unary(fn: Callable) -> Callable:
    """Map ServerError to its status code for a unary handler."""

    @functools.wraps(fn)
    async def wrapper(self: DetectorService, request, context: grpc.aio.ServicerContext):
        try:
            return await fn(self, request, context)
        except ServerError as e:
            await abort(context, status_code(e), redact_text(str(e)))

    return wrapper


class DetectorService(pb_grpc.DetectorServicer):
    """yolov12.v1.Detector over a ServerCore."""

    def __init__(self, core: ServerCore, executor: ThreadPoolExecutor | None = None) -> None:
        self.core = core
        self.executor = executor or ThreadPoolExecutor(max_workers=4, thread_name_prefix="decode")
        # GetSnapshot waits up to 5 s for a frame: in threads of its own, so that viewers of a dead camera never hold
        # the ones AddStream and RemoveStream run in; RESOURCE_EXHAUSTED beyond SNAPSHOT_WAITS at once
        self.snapshots = ThreadPoolExecutor(max_workers=SNAPSHOT_WAITS, thread_name_prefix="snapshot")
        self._snapshots_waiting = 0
        self._push_ids = itertools.count()

    def _names(self, result: FrameResult) -> dict[int, str]:
        return self.core.class_names(result.model_version, result.device)

    @_unary
    async def AddStream(self, request: pb.AddStreamRequest, context) -> pb.StreamInfo:
        """Register a camera to pull; returns at once in CONNECTING (UNAVAILABLE while the saved cameras are being
        added: the id may be one of them)."""
        self.core.check_started()
        spec = StreamSpec(request.stream_id, request.url, request.max_fps, request.min_score, tuple(request.classes),
                          zone_from_flat(request.zone),
                          request.blind_after_s if request.HasField("blind_after_s") else None, request.track,
                          tuple(request.class_min_scores.items()))
        # in a thread: the stream set is saved (fsync) before the answer, and the loop serves others meanwhile
        return messages.stream_info(await asyncio.to_thread(self.core.add_stream, spec))

    @_unary
    async def RemoveStream(self, request: pb.RemoveStreamRequest, context) -> pb.RemoveStreamResponse:
        """Stop a stream; returns its last state."""
        view = await asyncio.to_thread(self.core.remove_stream, request.stream_id)
        return pb.RemoveStreamResponse(stream=messages.stream_info(view))

    @_unary
    async def ListStreams(self, request: pb.ListStreamsRequest, context) -> pb.ListStreamsResponse:
        """Every registered stream with state, device and rates (UNAVAILABLE while the saved ones are being added:
        the list would be short of them)."""
        self.core.check_started()
        return pb.ListStreamsResponse(streams=[messages.stream_info(v) for v in self.core.list_streams()])

    @_unary
    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context) -> pb.ServerInfo:
        """Engines, devices, class names, input size, SLO."""
        return messages.server_info(self.core.server_info())

    @_unary
    async def GetSnapshot(self, request: pb.GetSnapshotRequest, context) -> pb.Snapshot:
        """The camera's next picture as JPEG (waited for in a thread: the loop serves others meanwhile)."""
        if self._snapshots_waiting >= SNAPSHOT_WAITS:
            raise ResourceExhaustedError(f"{SNAPSHOT_WAITS} snapshots are being taken already (each waits up to "
                                         f"{SNAPSHOT_WAIT_S:g} s for the camera's next frame): retry in a moment")
        self._snapshots_waiting += 1
        try:
            jpeg, width, height = await asyncio.get_running_loop().run_in_executor(
                self.snapshots, self.core.snapshot, request.stream_id)
        finally:
            self._snapshots_waiting -= 1
        return pb.Snapshot(stream_id=request.stream_id, jpeg=jpeg, width=width, height=height)

    async def _check_watch(self, stream_ids, context) -> list[str]:
        """The ids to watch (duplicates dropped); aborts NOT_FOUND / FAILED_PRECONDITION (another replica's) /
        UNAVAILABLE (draining, or starting: an unknown id may be a saved stream not added yet)."""
        ids = list(dict.fromkeys(stream_ids))
        missing = [i for i in ids if not self.core.has_stream(i)]
        for sid in missing:  # a camera of another replica: say which (FAILED_PRECONDITION)
            try:
                self.core.check_owner(sid)
            except WrongShardError as e:
                await abort(context, status_code(e), str(e))
        if missing:
            try:
                self.core.check_started()  # it may be one of the saved streams, not added yet: UNAVAILABLE
            except ServerError as e:
                await abort(context, status_code(e), str(e))
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no stream {quote_id(missing[0])} (ListStreams shows "
                        "the ids)")
        if self.core.draining:
            await abort(context, grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        return ids

    async def WatchDetections(self, request: pb.WatchDetectionsRequest, context) -> AsyncIterator[pb.FrameDetections]:
        """Results as published, from a bounded queue of this call's own (a slow reader loses its oldest)."""
        ids = await self._check_watch(request.stream_ids, context)
        sub = self.core.open_watch(ids or None, asyncio.get_running_loop(), peer_text(context.peer()))
        try:
            while (result := await sub.next()) is not None:  # error results too: `error` says why no detections
                yield messages.frame_detections(result, self._names(result))
        finally:
            self.core.close_watch(sub)

    async def WatchDetectionBatches(self, request: pb.WatchDetectionBatchesRequest,
                                    context) -> AsyncIterator[pb.DetectionBatch]:
        """Results in batches: wait for one, send every result waiting, then let the next gather for the rest of
        `max_delay_ms` (a batch that reached BATCH_LIMIT goes on at once: the watcher is behind). The queue holds
        --batch-subscriber-queue results; a watcher further behind loses its oldest (`dropped` says how many)."""
        ids = await self._check_watch(request.stream_ids, context)
        delay_ms = request.max_delay_ms or self.core.config.watch_batch_ms
        if not 1 <= delay_ms <= 1000:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"max_delay_ms must be 1..1000 (0: the server's "
                        f"{self.core.config.watch_batch_ms:g}), got {delay_ms}")
        delay = delay_ms / 1000.0
        loop = asyncio.get_running_loop()
        sub = self.core.open_watch(ids or None, loop, peer_text(context.peer()), batched=True)
        try:
            budget = self.core.config.max_message_bytes // 2
            while (taken := await sub.next_batch(BATCH_LIMIT, _weigh, budget)) is not None:
                results, lost = taken
                started = loop.time()
                yield pb.DetectionBatch(results=[messages.frame_detections(r, self._names(r)) for r in results],
                                        dropped=lost)
                full = len(results) >= BATCH_LIMIT or sum(map(_weigh, results)) > budget // 2
                if not full:  # the next batch gathers for the rest of the period (a full one: behind, go on at once)
                    await asyncio.sleep(max(0.0, delay - (loop.time() - started)))
        finally:
            self.core.close_watch(sub)

    async def Detect(self, request_iterator: AsyncIterator[pb.Frame], context) -> AsyncIterator[pb.FrameDetections]:
        """Push mode: one stream per call, results in order, frames read only while fewer than 2 are pending."""
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        sid = first.stream_id or f"push-{next(self._push_ids)}"
        try:
            call = PushCall(self.core, self.core.open_push(sid), self.executor)
            async for result in call.results(first, request_iterator):
                yield messages.frame_detections(result, self._names(result), sid)
        except ServerError as e:
            await abort(context, status_code(e), redact_text(str(e)))
        except Exception as e:  # a broken client stream, mostly
            log.exception("Detect call on %s failed", sid)
            await abort(context, grpc.StatusCode.INTERNAL, redact_text(f"{type(e).__name__}: {e}"))

    @_unary
    async def DetectImage(self, request: pb.Frame, context) -> pb.FrameDetections:
        """One image through the same scheduler and engines as the cameras."""
        received = now()
        if request.stream_id:  # echoed in the answer: the same rules as a stream's id
            validate_stream_id(request.stream_id)
        stream = self.core.open_image()
        sub = self.core.fanout.subscribe([stream.stream_id], 2, asyncio.get_running_loop())
        try:
            await asyncio.get_running_loop().run_in_executor(
                self.executor, self.core.ingest_encoded, stream, request.data, request.encoding, request.width,
                request.height, request.frame_id, request.capture_time_us or time.time_ns() // 1000, received)
            result = await sub.next()
        finally:
            self.core.fanout.unsubscribe(sub)
            self.core.close_stream(stream)
        if result is None:
            raise UnavailableError("the server is shutting down")
        if result.drop_reason == "invalid":  # decoded in a device process (--worker-processes): a bad image
            raise InvalidArgumentError(result.error)
        if result.drop_reason == "late":
            raise ResourceExhaustedError(f"{result.error}: retry later")
        if result.error is not None:
            await abort(context, grpc.StatusCode.INTERNAL, result.error)
        return messages.frame_detections(result, self._names(result), request.stream_id)

    @_unary
    async def ReloadEngines(self, request: pb.ReloadEnginesRequest, context) -> pb.ReloadEnginesResponse:
        """Operator: swap in the engine files (again), streams flowing; a bad file is refused, the old kept."""
        view = await asyncio.to_thread(self.core.reload_engines, list(request.engines))
        return pb.ReloadEnginesResponse(engines=messages.server_info(view).engines)


class GrpcServer:
    """The aio server with the Detector, health and reflection services; `start()` then `stop(grace)`. `security`
    (security.py) brings TLS, tokens and the malformed-request guard; by default plaintext without tokens."""

    def __init__(self, core: ServerCore, address: str, max_message_bytes: int,
                 security: Security | None = None) -> None:
        self.core = core
        self.security = security = security or Security()
        per_client = core.config.max_calls_per_client or default_per_client(core.config.max_concurrent_rpcs)
        chain = security.interceptors()  # the token check first, then the limit per client, then the guard
        chain.insert(len(chain) - 1, PerClientCallLimit(per_client))
        self.server = grpc.aio.server(interceptors=chain, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ], maximum_concurrent_rpcs=core.config.max_concurrent_rpcs)  # beyond: RESOURCE_EXHAUSTED, memory bounded
        self.service = DetectorService(core)
        pb_grpc.add_DetectorServicer_to_server(self.service, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.health_only: grpc.aio.Server | None = None  # --health-port (healthport.py)
        if security.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
                self.server)
        check_bindable(address)  # grpc would log its own multi-line error before failing
        credentials = security.server_credentials()
        try:  # grpc returns 0 or, in newer releases, raises RuntimeError when it cannot bind
            self.port = (self.server.add_insecure_port(address) if credentials is None
                         else self.server.add_secure_port(address, credentials))
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen for gRPC on {address}: grpc could not bind it; check --host and --port")

    async def set_serving(self, serving: bool) -> None:
        """Flip the health status of the whole server and of the Detector service."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def set_device_serving(self, device: str, serving: bool) -> None:
        """Flip one device's health (service name `yolov12.v1.Detector/DEVICE`, e.g. `.../cuda:1`): NOT_SERVING
        while its engine is out of service, though the server may still serve on the others."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(device_health_name(device), status)

    async def start(self) -> None:
        """Listen; health says NOT_SERVING until the core has loaded its engines."""
        await self.set_serving(False)
        await self.server.start()

    async def serve_health_on(self, host: str, port: int) -> int:
        """Also answer grpc.health.v1 alone, plaintext, on host:port (--health-port); returns the bound port."""
        self.health_only, bound = await start_health_port(self.health, host, port)
        return bound

    async def stop(self, grace: float) -> None:
        """Refuse new calls, give running ones `grace` seconds, then cancel them."""
        await self.server.stop(grace)
        if self.health_only is not None:
            await self.health_only.stop(0)
        self.service.executor.shutdown(wait=False, cancel_futures=True)
        self.service.snapshots.shutdown(wait=False, cancel_futures=True)


async def create_server(core: ServerCore, address: str = "127.0.0.1:0", max_message_bytes: int = 32 * 1024 * 1024,
                        security: Security | None = None) -> tuple[GrpcServer, int]:
    """Build and start the gRPC server on `address` (port 0: any free port); returns it and the bound port."""
    server = GrpcServer(core, address, max_message_bytes, security)
    await server.start()
    return server, server.port
