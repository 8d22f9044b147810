"""Every request answered with a status that says what happened: a gRPC interceptor for what the servicer never sees.

grpc.aio answers a request it cannot parse (corrupt wire format, a string field that is not UTF-8) and any
exception a handler lets escape with UNKNOWN and the exception's text: the first is the client's mistake
(INVALID_ARGUMENT), the second a bug of ours (INTERNAL, logged here with its traceback, the text not sent: it
may quote a camera URL). This interceptor wraps each handler so: requests are parsed by a deserializer that
turns a parse failure into a marker answered INVALID_ARGUMENT, and unexpected exceptions become INTERNAL.
Calls that end as grpc means them to (abort, cancellation) pass untouched.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from .errors import InvalidArgumentError

__all__ = ["GuardInterceptor", "Malformed", "MalformedRequestError"]

log = logging.getLogger(__name__)


class Malformed:
    """Stands for a request message that could not be parsed."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


class MalformedRequestError(InvalidArgumentError):
    """Raised by a streamed call's request iterator at a message that could not be parsed (the servicer maps it to
    INVALID_ARGUMENT like any bad frame; where it does not, the guard does)."""


def _lenient(deserializer: Callable[[bytes], object] | None) -> Callable[[bytes], object] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> object:
        try:
            return deserializer(data)
        except Exception as e:  # DecodeError, mostly: wire format corrupt, bad UTF-8 in a string field
            return Malformed(f"{type(e).__name__}: {e}")

    return parse


def _invalid(method: str, bad: Malformed) -> str:
    return f"the {method.rsplit('/', 1)[-1]} request cannot be parsed ({bad.error})"


async def _internal(context: grpc.aio.ServicerContext, method: str, e: Exception) -> None:
    log.error("%s failed", method, exc_info=e)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.rsplit('/', 1)[-1]} "
                        f"({type(e).__name__}; the server log has the details)")


def _checked_requests(requests: AsyncIterator[object], context: grpc.aio.ServicerContext,
                      method: str) -> AsyncIterator[object]:
    async def gen():
        async for request in requests:
            if isinstance(request, Malformed):
                raise MalformedRequestError(_invalid(method, request))
            yield request

    return gen()


def guard(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """`handler` with lenient parsing and exceptions mapped (see the module docstring); a handler whose behaviour is
    not asynchronous (no servicer of this server's) is returned as it is."""
    fn = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    generator = inspect.isasyncgenfunction(fn)  # streamed responses yielded, or written with context.write
    if not (generator or inspect.iscoroutinefunction(fn)):
        return handler
    streamed_in, streamed_out = handler.request_streaming, handler.response_streaming

    async def check(request, context: grpc.aio.ServicerContext):
        """The request (or the checked request iterator) the behaviour gets."""
        if streamed_in:
            return _checked_requests(request, context, method)
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _invalid(method, request))
        return request

    async def failed(context: grpc.aio.ServicerContext, e: Exception) -> None:
        if isinstance(e, MalformedRequestError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        await _internal(context, method, e)

    if generator:
        async def behaviour(request, context):
            checked = await check(request, context)
            try:
                async for response in fn(checked, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                await failed(context, e)
    else:
        async def behaviour(request, context):
            checked = await check(request, context)
            try:
                return await fn(checked, context)
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                await failed(context, e)

    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return make[(streamed_in, streamed_out)](behaviour, request_deserializer=_lenient(handler.request_deserializer),
                                             response_serializer=handler.response_serializer)


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Applies `guard` to every method's handler."""

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return guard(handler, handler_call_details.method)
