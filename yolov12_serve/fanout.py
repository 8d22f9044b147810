"""Results fan-out: every subscriber has its own bounded queue; a slow one loses its own oldest results, nobody waits.

Workers publish from their threads; a subscriber reads from asyncio (gRPC handlers, woken through
`call_soon_threadsafe` only while one is parked waiting: a reader busy sending is not woken again for
every result, so a batch of 32 costs one wake-up, not 32) or from a plain thread (`get(timeout)`).
Publishing never blocks. A reader takes one result at a time (`next`: WatchDetections, a message each) or all
that waited at once (`next_batch`: WatchDetectionBatches, whose per-message cost is then paid per batch).

A subscriber may carry a `label` (the watch RPCs: a sequence number and the peer): its losses are reported
with it (`on_overflow(sub, n)`), so a metric can name the watcher that falls behind; the label's series go
when it disconnects, so their number stays that of the watchers connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterable

from .frames import FrameResult

__all__ = ["Fanout", "Subscription"]


class Subscription:
    """One reader's bounded queue of results, filtered by stream id (None: every public stream)."""

    def __init__(self, stream_ids: Iterable[str] | None, maxsize: int,
                 loop: asyncio.AbstractEventLoop | None = None,
                 on_overflow: Callable[[Subscription, int], None] | None = None, label: str | None = None) -> None:
        self.stream_ids = frozenset(stream_ids) if stream_ids else None
        self.maxsize = max(1, int(maxsize))
        self.label = label  # names this subscriber in metrics (None: an internal one, a push call's or an image's)
        self.dropped = 0  # results this subscriber lost because it read too slowly
        self._reported = 0  # `dropped` as of the last next_batch (its batch says how many it lost since)
        self._queue: deque[FrameResult] = deque()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._loop = loop
        self._event = asyncio.Event() if loop is not None else None
        self._closed = False
        self._parked = False  # an asyncio reader found the queue empty and awaits the event: offer() wakes it
        self._on_overflow = on_overflow

    def wants(self, result: FrameResult) -> bool:
        """True when this subscriber should receive `result`."""
        if self.stream_ids is None:
            return result.public
        return result.stream_id in self.stream_ids

    def offer(self, result: FrameResult) -> None:
        """Queue `result` (called from worker threads); on overflow drop this subscriber's oldest result."""
        with self._lock:
            if self._closed:
                return
            overflow = len(self._queue) >= self.maxsize
            if overflow:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(result)
            self._cond.notify()
            wake, self._parked = self._parked, False
        if overflow and self._on_overflow is not None:
            self._on_overflow(self, 1)
        if wake:
            self._wake()

    def _wake(self) -> None:
        if self._loop is not None and self._event is not None:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is reading any more
                self._loop.call_soon_threadsafe(self._event.set)

    def close(self) -> None:
        """End the subscription: readers get None once the queue is empty."""
        with self._lock:
            self._closed = True
            self._cond.notify_all()
        self._wake()

    @property
    def closed(self) -> bool:
        """True once closed (by the reader leaving or a server drain)."""
        return self._closed

    async def next(self) -> FrameResult | None:
        """Await the next result (asyncio readers); None when the subscription was closed."""
        assert self._event is not None, "subscribe with loop=... to read from asyncio"
        while True:
            with self._lock:  # the emptiness check and parking are one step: an offer() after it wakes us
                if self._queue:
                    return self._queue.popleft()
                if self._closed:
                    return None
                self._parked = True
            self._event.clear()  # a wake scheduled by that offer() runs after this (same loop), never before
            await self._event.wait()

    async def next_batch(self, limit: int = 1024, weigh: Callable[[FrameResult], int] | None = None,
                         budget: float = float("inf")) -> tuple[list[FrameResult], int] | None:
        """Await at least one result, then take those waiting, oldest first, up to `limit` of them and up to
        `budget` in total `weigh`t (at least one); with how many this subscriber lost since the previous call.
        None when the subscription was closed and is empty."""
        assert self._event is not None, "subscribe with loop=... to read from asyncio"
        while True:
            with self._lock:
                if self._queue:
                    taken = [self._queue.popleft()]
                    if weigh is None:
                        n = min(len(self._queue), max(1, limit) - 1)
                        taken += [self._queue.popleft() for _ in range(n)]
                    else:
                        used = weigh(taken[0])
                        while self._queue and len(taken) < limit:
                            used += weigh(self._queue[0])
                            if used > budget:
                                break
                            taken.append(self._queue.popleft())
                    lost, self._reported = self.dropped - self._reported, self.dropped
                    return taken, lost
                if self._closed:
                    return None
                self._parked = True
            self._event.clear()
            await self._event.wait()

    def get(self, timeout: float | None = None) -> FrameResult | None:
        """Block up to `timeout` for the next result (thread readers); None on timeout or close."""
        with self._cond:
            if not self._queue and not self._closed:
                self._cond.wait(timeout)
            return self._queue.popleft() if self._queue else None

    def __len__(self) -> int:
        return len(self._queue)


class Fanout:
    """Hands each published result to every subscription that wants it; never blocks the publisher."""

    def __init__(self, on_overflow: Callable[[Subscription, int], None] | None = None) -> None:
        self._subs: list[Subscription] = []
        self._lock = threading.Lock()
        self._on_overflow = on_overflow

    def subscribe(self, stream_ids: Iterable[str] | None = None, maxsize: int = 64,
                  loop: asyncio.AbstractEventLoop | None = None, label: str | None = None) -> Subscription:
        """A new subscription; pass the running loop to read it with `await sub.next()` / `sub.next_batch()`."""
        sub = Subscription(stream_ids, maxsize, loop, self._on_overflow, label)
        with self._lock:
            self._subs = [*self._subs, sub]
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Remove and close a subscription."""
        with self._lock:
            self._subs = [s for s in self._subs if s is not sub]
        sub.close()

    def publish(self, result: FrameResult) -> None:
        """Offer `result` to every interested subscriber (copy-on-write list: no lock held while offering)."""
        for sub in self._subs:
            if sub.wants(result):
                sub.offer(result)

    def close_all(self) -> None:
        """Close every subscription (server shutdown): readers drain what they have, then end."""
        with self._lock:
            subs, self._subs = self._subs, []
        for sub in subs:
            sub.close()

    def subscriptions(self) -> list[Subscription]:
        """The current subscriptions (a copy)."""
        return list(self._subs)

    def __len__(self) -> int:
        return len(self._subs)
