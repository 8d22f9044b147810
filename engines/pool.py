"""A fixed set of K interchangeable workers (sessions, execution contexts) lent to at most K callers at once.

Each backend keeps its K instances here so `Engine.infer` is thread-safe: a caller borrows one
instance for the length of a call and blocks only while all K are busy.
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Iterator
from typing import Generic, TypeVar

from .base import EngineError

__all__ = ["InstancePool"]

T = TypeVar("T")


class InstancePool(Generic[T]):
    """Lend one of `items` per `with pool.borrow() as item:`; callers beyond len(items) wait their turn."""

    def __init__(self, items: list[T]) -> None:
        if not items:
            raise EngineError("an engine needs at least one instance (instances >= 1)")
        self.items = list(items)
        self._free: queue.SimpleQueue[T] = queue.SimpleQueue()
        for item in self.items:
            self._free.put(item)
        self._closed = False

    def __len__(self) -> int:
        return len(self.items)

    @contextlib.contextmanager
    def borrow(self) -> Iterator[T]:
        """Take a free instance (waiting if all are busy) and give it back when the block ends."""
        if self._closed:
            raise EngineError("the engine was closed: load it again")
        item = self._free.get()
        try:
            yield item
        finally:
            self._free.put(item)

    def close(self) -> list[T]:
        """Refuse further borrows; returns the instances so the backend can free them."""
        self._closed = True
        return self.items
