"""Long-lived calls counted per client: one client, with one token and one connection, could hold every one of
--max-concurrent-rpcs with watches, and the main port's health checks were then refused with everything else.

Calls that stream their answers (WatchDetections, WatchDetectionBatches, Detect, health's Watch) are counted per
client address (the peer's IP; every port of it); beyond `--max-calls-per-client` (default: all but HEADROOM of
--max-concurrent-rpcs) a new one is RESOURCE_EXHAUSTED at once. Unary calls (ListStreams, health Check,
GetSnapshot, ...) are not counted: they end by themselves.
"""

from __future__ import annotations

import inspect
import urllib.parse
from collections.abc import AsyncIterator

import grpc

__all__ = ["HEADROOM", "PerClientCallLimit", "client_address", "default_per_client", "peer_text"]


HEADROOM = 8  # calls of --max-concurrent-rpcs one client leaves to the others (health checks, operators)


def default_per_client(max_concurrent_rpcs: int) -> int:
    """--max-calls-per-client when not given: all but HEADROOM of the server's calls (all of a small limit)."""
    return max_concurrent_rpcs - HEADROOM if max_concurrent_rpcs > 2 * HEADROOM else max_concurrent_rpcs


def peer_text(peer: str) -> str:
    """A gRPC peer as people write it: gRPC gives an IPv6 one percent-encoded ('ipv6:%5B::1%5D:5123'), which a log
    line or a metric label would otherwise show, and a search for the address would not find."""
    return urllib.parse.unquote(peer)


def client_address(peer: str) -> str:
    """'ipv4:10.1.2.3:5123' -> '10.1.2.3', 'ipv6:[::1]:5123' (or gRPC's 'ipv6:%5B::1%5D:5123') -> '[::1]'; other
    forms (unix:...) as they are."""
    kind, _, rest = peer_text(peer).partition(":")
    if kind in ("ipv4", "ipv6") and rest:
        return rest.rpartition(":")[0] or rest
    return peer


class PerClientCallLimit(grpc.aio.ServerInterceptor):
    """At most `limit` answer-streaming calls open per client address."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}  # client address -> its calls open (the event loop's thread only)

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if handler is None or not handler.response_streaming:
            return handler
        streamed_in = handler.request_streaming
        fn = handler.stream_stream if streamed_in else handler.unary_stream
        if not (inspect.isasyncgenfunction(fn) or inspect.iscoroutinefunction(fn)):
            return handler  # not an asyncio servicer's
        limit, open_calls = self.limit, self.open

        async def enter(context: grpc.aio.ServicerContext) -> str:
            client = client_address(context.peer() or "")
            n = open_calls.get(client, 0)
            if n >= limit:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"this client ({client}) has {n} watch or Detect calls open, the limit per client "
                                    "(--max-calls-per-client): end some, or watch several streams in one call")
            open_calls[client] = n + 1
            return client

        def leave(client: str) -> None:
            left = open_calls.get(client, 1) - 1
            if left > 0:
                open_calls[client] = left
            else:
                open_calls.pop(client, None)

        if inspect.isasyncgenfunction(fn):  # answers yielded
            async def behaviour(request, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
                client = await enter(context)
                try:
                    async for response in fn(request, context):
                        yield response
                finally:
                    leave(client)
        else:  # answers written with context.write (grpc.health's Watch)
            async def behaviour(request, context: grpc.aio.ServicerContext) -> None:  # type: ignore[misc]
                client = await enter(context)
                try:
                    await fn(request, context)
                finally:
                    leave(client)

        make = grpc.stream_stream_rpc_method_handler if streamed_in else grpc.unary_stream_rpc_method_handler
        return make(behaviour, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
