"""One Detect call (push mode): frames of one stream in, their results out in the same order.

Back-pressure instead of queueing: the next frame is read from the client only while fewer than PUSH_WINDOW
frames are pending (one decoding or waiting while one runs), so gRPC flow control slows a client that sends
faster than the engine answers, and no pushed frame is ever superseded. A frame that cannot run within the
latency objective while the server is overloaded is dropped as "late" like a camera's (with room to spare it
runs late), and answered all the same: its FrameDetections carry `error` (so does a frame the engine failed
on) and the call goes on. Frames are decoded and letterboxed in a thread pool; the call ends when the client
has sent its last frame and every frame has been answered, or with an error: a bad frame (INVALID_ARGUMENT naming
its frame_id, once the frames before it are answered), its stream removed meanwhile (ABORTED), the server
draining (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from typing import Any

from .config import quote_id
from .core import ServerCore
from .errors import AbortedError, InvalidArgumentError, UnavailableError
from .frames import FrameResult, now
from .sources.base import StreamState
from .stream import PUSH_WINDOW, Stream

__all__ = ["PushCall"]


class PushCall:
    """Runs one push stream's frames through the core; iterate `results(first, rest)` for its FrameResults."""

    def __init__(self, core: ServerCore, stream: Stream, executor: Executor) -> None:
        self.core = core
        self.stream = stream
        self.executor = executor
        self.sent = 0
        self.answered = 0
        self.client_done = False
        self.error: BaseException | None = None
        self.pending: deque[int] = deque()  # frame ids sent and not yet answered, in order

    def _ahead_of(self, frame_id: int) -> int:
        """How many of the frames waiting for an answer were sent before the (first pending) frame `frame_id`."""
        try:
            return self.pending.index(frame_id)
        except ValueError:
            return 0

    async def results(self, first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[FrameResult]:
        """Feed `first` then `rest` (Frame messages); yield one result per frame, in order; ServerError on failure."""
        loop = asyncio.get_running_loop()
        sid = self.stream.stream_id
        sub = self.core.fanout.subscribe([sid], PUSH_WINDOW + 2, loop)
        self.stream.on_close(sub.close)  # RemoveStream from elsewhere (or a drain) ends this call
        window = asyncio.Semaphore(PUSH_WINDOW)
        reader = asyncio.create_task(self._read(first, rest, window, sub.close))
        try:
            while (result := await sub.next()) is not None:
                if result.drop_reason == "invalid":  # decoded in a device process: the client's bad frame, told
                    reader.cancel()  # at once, ahead of the frames before it: those are still answered, no more read
                    self.error = InvalidArgumentError(f"frame {result.frame_id}: {result.error}")
                    self.client_done = True
                    self.sent = self.answered + self._ahead_of(result.frame_id)
                else:
                    window.release()
                    self.answered += 1
                    self.pending.popleft()
                    yield result  # an error result too: `error` says why this frame has no detections
                if self.client_done and self.answered == self.sent:
                    break
        finally:
            reader.cancel()
            self.core.fanout.unsubscribe(sub)
            removed = self.stream.state == StreamState.STOPPED
            self.core.close_stream(self.stream)
        if self.error is not None:
            raise self.error
        if self.core.draining:
            raise UnavailableError("the server is shutting down")
        if removed:
            raise AbortedError(f"stream {sid!r} was removed (RemoveStream)")

    async def _read(self, first: Any, rest: AsyncIterator[Any], window: asyncio.Semaphore, stop) -> None:
        loop = asyncio.get_running_loop()
        sid = self.stream.stream_id
        msg = first
        try:
            while msg is not None:
                if msg.stream_id and msg.stream_id != sid:
                    raise InvalidArgumentError(f"one Detect call carries one stream: got {quote_id(msg.stream_id)} "
                                               f"after {sid!r} (open a call per stream)")
                await window.acquire()
                received = now()
                # counted before it is handed over: a fast engine publishes it, and `results` takes its answer,
                # before the executor's return reaches this coroutine
                self.sent += 1
                self.pending.append(msg.frame_id)
                try:
                    await loop.run_in_executor(self.executor, self.core.ingest_encoded, self.stream, msg.data,
                                               msg.encoding, msg.width, msg.height, msg.frame_id,
                                               msg.capture_time_us or time.time_ns() // 1000, received)
                except Exception as e:  # not taken: not waited for (a cancel is results' own doing: it recounts)
                    self.sent -= 1
                    self.pending.pop()
                    if isinstance(e, InvalidArgumentError):
                        raise InvalidArgumentError(f"frame {msg.frame_id}: {e}") from None
                    raise
                msg = await anext(aiter(rest), None)
        except Exception as e:  # a bad frame (or a broken client stream) ends the call with its status, once the
            self.error = e      # frames before it are answered
        self.client_done = True
        if self.sent == self.answered:
            stop()
