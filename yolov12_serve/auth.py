"""Bearer tokens with roles (`--auth-token-file`), checked by a gRPC interceptor before a request is even read.

The token file holds one token and its role per line (`TOKEN ROLE`); blank lines and `#` comments are ignored:

    # yolov12-serve tokens: make each with `openssl rand -hex 32`
    3f1c...9a  operator     # the line-control PC
    77b0...e2  viewer       # dashboards

Roles: `viewer` may watch and ask (WatchDetections, WatchDetectionBatches, ListStreams, GetServerInfo, Detect,
DetectImage, server reflection); `operator` may also change what the server does (AddStream, RemoveStream,
ReloadEngines). `grpc.health.v1.Health` stays open, for load balancers and Kubernetes probes. A method the table
does not know needs `operator` (a new RPC is closed until someone decides who may call it).

Clients send `authorization: Bearer TOKEN` metadata. No token, or one the file does not hold: UNAUTHENTICATED; a
viewer calling an operator method: PERMISSION_DENIED. Refused calls are answered without reading their request,
and logged per client address on change (the audit trail, which a client retrying in a loop cannot flood).
Tokens are kept only as SHA-256 digests and compared in constant time (every entry, hmac.compare_digest), never
logged. The file is read again on SIGHUP (security.py): a broken file then keeps the tokens already loaded. A
streaming call (a watch, a Detect push) outlives its start: when a reload takes its token away, or leaves it too low
a role, the call is ended at once with UNAUTHENTICATED / PERMISSION_DENIED and logged (`revoke`), so that removing
a viewer's token cuts off its `watch --follow` rather than letting it stream until it disconnects.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import inspect
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from .calllimits import peer_text
from .errors import ConfigError
from .faultlog import FaultLog

__all__ = ["METHOD_ROLES", "MIN_TOKEN_LEN", "OPEN", "ROLES", "AuthInterceptor", "TokenTable", "bearer_token",
           "deny", "required_role", "warn_if_readable_by_others"]

log = logging.getLogger(__name__)

ROLES = ("viewer", "operator")  # each may do what the ones before it may
OPEN = ""  # the role of methods that need no token
MIN_TOKEN_LEN = 16
MAX_REFUSING_PEERS = 256  # client addresses whose refusals are followed (the least recent forgotten)
_DETECTOR = "/yolov12.v1.Detector/"
METHOD_ROLES: dict[str, str] = {
    **{_DETECTOR + m: "viewer" for m in ("WatchDetections", "WatchDetectionBatches", "ListStreams", "GetServerInfo",
                                         "Detect", "DetectImage", "GetSnapshot")},
    **{_DETECTOR + m: "operator" for m in ("AddStream", "RemoveStream", "ReloadEngines")},
    **{f"/grpc.health.v1.Health/{m}": OPEN for m in ("Check", "Watch", "List")},
    # reflection describes the API (no data), but it is the map an intruder reads first: a token is asked
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "viewer",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": "viewer",
}


def required_role(method: str) -> str:
    """The role `method` ('/package.Service/Method') needs: OPEN, 'viewer' or 'operator' (unknown: operator)."""
    return METHOD_ROLES.get(method, "operator")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class TokenTable:
    """The tokens of one token file, as (SHA-256 digest, role) pairs."""

    entries: tuple[tuple[bytes, str], ...]
    path: str = ""

    @classmethod
    def load(cls, path: str | Path) -> TokenTable:
        """Read a token file; ConfigError naming the file and line (never the token) for anything wrong."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read --auth-token-file {path}: {getattr(e, 'strerror', None) or e}") from None
        entries: list[tuple[bytes, str]] = []
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            fields = line.split()
            if len(fields) != 2:
                raise ConfigError(f"--auth-token-file {path}, line {n}: expected 'TOKEN ROLE' (role viewer or "
                                  f"operator), got {len(fields)} field{'s' if len(fields) != 1 else ''}")
            token, role = fields
            if role not in ROLES:
                raise ConfigError(f"--auth-token-file {path}, line {n}: unknown role {role!r} (viewer or operator)")
            if len(token) < MIN_TOKEN_LEN:
                raise ConfigError(f"--auth-token-file {path}, line {n}: the token is {len(token)} characters; use "
                                  f"at least {MIN_TOKEN_LEN} (e.g. `openssl rand -hex 32`)")
            digest = _digest(token)
            if any(d == digest for d, _ in entries):
                raise ConfigError(f"--auth-token-file {path}, line {n}: this token is already listed above")
            entries.append((digest, role))
        if not entries:
            raise ConfigError(f"--auth-token-file {path} holds no token: add lines 'TOKEN ROLE'")
        warn_if_readable_by_others(path)
        return cls(tuple(entries), str(path))

    def role_of(self, token: str) -> str | None:
        """The role of `token`, or None; the time taken depends on the number of entries, not on the token."""
        digest = _digest(token)
        found: str | None = None
        for known, role in self.entries:
            if hmac.compare_digest(digest, known):
                found = role
        return found

    def counts(self) -> dict[str, int]:
        """How many tokens each role has (for the log)."""
        return {r: sum(1 for _, role in self.entries if role == r) for r in ROLES}


def warn_if_readable_by_others(path: Path, flag: str = "--auth-token-file") -> None:
    """A secrets file (tokens, OPC UA users) that other users may read: a warning naming its flag and the fix."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s %s can be read by other users (mode %o): chmod 600 it", flag, path, mode & 0o777)


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer TOKEN` entry, or None."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str,
         on_deny: Callable[[str], None] = lambda peer: None) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers `code` without reading the request (`on_deny(peer)`
    told first)."""

    async def unary(request: object, context: grpc.aio.ServicerContext) -> None:
        on_deny(context.peer())
        await context.abort(code, message)

    async def streaming(request: object, context: grpc.aio.ServicerContext):
        on_deny(context.peer())
        await context.abort(code, message)
        yield  # pragma: no cover - an async generator, as grpc wants for streamed responses

    kw = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


@dataclass(eq=False)  # each call is itself (a set of them by identity)
class _OpenCall:
    """A streaming call that a token allowed, while it runs: ended by `AuthInterceptor.revoke` if a reload takes the
    token's right away."""

    method: str
    token: str
    need: str
    peer: str = ""
    task: asyncio.Task | None = None
    revoked: tuple[grpc.StatusCode, str] | None = None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks each call's bearer token against the current TokenTable (`table()`, swapped on reload). Refusals are
    the security team's audit trail: logged per client address on change (its first refusal and each new reason,
    then summaries at growing intervals), so a client retrying a wrong token in a loop cannot flood the log.
    Streaming calls are followed while they run, so that `revoke` can end those a reload took the right from."""

    def __init__(self, table: Callable[[], TokenTable]) -> None:
        self._table = table
        self._refusals: collections.OrderedDict[str, FaultLog] = collections.OrderedDict()  # address -> its log
        self._open: set[_OpenCall] = set()  # streaming calls running now (the event loop's thread only)

    def revoke(self, table: TokenTable) -> int:
        """After a reload to `table`: end the streaming calls whose token it no longer holds, or holds with too low a
        role; returns how many. Called in the event loop's thread (SIGHUP's handler), as the calls run there."""
        ended = 0
        for call in list(self._open):
            role = table.role_of(call.token)
            if role is not None and ROLES.index(role) >= ROLES.index(call.need):
                continue
            name = call.method.rsplit("/", 1)[-1]
            call.revoked = ((grpc.StatusCode.UNAUTHENTICATED, "the token was removed from the server's token file")
                            if role is None else
                            (grpc.StatusCode.PERMISSION_DENIED, f"{name} needs the {call.need} role; this token is "
                             f"a {role}'s now"))
            log.warning("auth: a %s call from %s ended: %s", name, call.peer, call.revoked[1])
            if call.task is not None:
                call.task.cancel()
            ended += 1
        return ended

    def _followed(self, handler: grpc.RpcMethodHandler, method: str, token: str, need: str) -> grpc.RpcMethodHandler:
        """`handler` with its streamed answer followed while it runs (revoke ends it); other shapes as they are."""
        behavior = handler.unary_stream or handler.stream_stream
        if not handler.response_streaming or not inspect.isasyncgenfunction(behavior):
            return handler
        calls = self._open

        async def followed(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
            call = _OpenCall(method, token, need, peer_text(context.peer()), asyncio.current_task())
            calls.add(call)
            try:
                async for answer in behavior(request, context):
                    yield answer
            except asyncio.CancelledError:
                if call.revoked is None:
                    raise  # the client went, or the server stops
                if call.task is not None and hasattr(call.task, "uncancel"):
                    call.task.uncancel()  # consumed: the call ends with the refusal, not as cancelled
                await context.abort(*call.revoked)
            finally:
                calls.discard(call)

        kw = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(followed, **kw)
        return grpc.unary_stream_rpc_method_handler(followed, **kw)

    def _refused(self, code: grpc.StatusCode, why: str) -> Callable[[str], None]:
        def note(peer: str) -> None:
            peer = peer_text(peer)  # ipv6:[::1], not gRPC's ipv6:%5B::1%5D
            address = peer.rsplit(":", 1)[0] if peer.count(":") > 1 else peer  # ipv4:10.0.0.9:5000 -> ipv4:10.0.0.9
            faults = self._refusals.pop(address, None) or FaultLog(log, "auth: calls refused from %s", (address,))
            self._refusals[address] = faults  # the most recent last
            while len(self._refusals) > MAX_REFUSING_PEERS:
                self._refusals.popitem(last=False)
            faults.failed(f"{code.name}: {why}")
        return note

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        need = required_role(method)
        if need == OPEN:
            return handler
        # an unknown method is UNIMPLEMENTED, but only to a caller allowed to call it: the refusal says nothing
        shape = handler or grpc.unary_unary_rpc_method_handler(None)
        token = bearer_token(handler_call_details.invocation_metadata)
        unauthenticated = grpc.StatusCode.UNAUTHENTICATED
        if token is None:
            return deny(shape, unauthenticated, "this server needs a token: send metadata 'authorization: Bearer "
                        "TOKEN' (the Python client: Client(..., token=...))",
                        self._refused(unauthenticated, "no token"))
        role = self._table().role_of(token)
        if role is None:
            return deny(shape, unauthenticated, "the token is not valid on this server",
                        self._refused(unauthenticated, "a token not valid on this server"))
        if ROLES.index(role) < ROLES.index(need):
            name = method.rsplit("/", 1)[-1]
            why = f"{name} needs the {need} role; this token is a {role}'s"
            return deny(shape, grpc.StatusCode.PERMISSION_DENIED, why,
                        self._refused(grpc.StatusCode.PERMISSION_DENIED, why))
        if handler is None:
            return None  # an unknown method: grpc answers UNIMPLEMENTED
        return self._followed(handler, method, token, need)
