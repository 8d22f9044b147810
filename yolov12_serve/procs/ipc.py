"""The wire between the API process and a device process: pickled lists of tuples over a multiprocessing Pipe.

One direction each way. The device process sends events through an `Outbox`: a thread that gathers them and
sends one message per `interval` at most (a few ms), so thousands of results a second cost a few hundred
messages; counts that only add up (frames ingested, frames superseded) are summed in the outbox instead of sent
one by one. The API process sends commands (`send`) from whichever thread acts, under a lock.
"""

from __future__ import annotations

import pickle
import threading
from collections import Counter
from typing import Any

__all__ = ["Outbox", "dumps", "loads"]

PROTOCOL = pickle.HIGHEST_PROTOCOL


def dumps(items: list[Any]) -> bytes:
    return pickle.dumps(items, PROTOCOL)


def loads(data: bytes) -> list[Any]:
    return pickle.loads(data)


class Outbox:
    """Events to the API process, sent in batches from a thread of their own (`put`, `count` never block on the
    pipe). `on_broken` is called once if the pipe breaks (the API process is gone)."""

    def __init__(self, conn: Any, interval: float = 0.005, limit: int = 4096, on_broken: Any = None) -> None:
        self._conn = conn
        self.interval = interval
        self.limit = limit
        self._items: list[tuple] = []
        self._counts: dict[str, Counter] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._on_broken = on_broken
        self._send_lock = threading.Lock()  # a Connection is not safe for two senders (flush() at exit)
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    def put(self, item: tuple) -> None:
        with self._cond:
            self._items.append(item)
            if len(self._items) == 1 or len(self._items) >= self.limit:
                self._cond.notify()

    def count(self, kind: str, key: tuple, n: int = 1) -> None:
        """Add `n` to the count `kind`/`key`: sent as ('counts', kind, {key: n}) with the next message."""
        with self._cond:
            counter = self._counts.get(kind)
            if counter is None:
                counter = self._counts[kind] = Counter()
            counter[key] += n
            if not self._items and len(counter) == 1 and counter[key] == n:
                self._cond.notify()

    def flush(self) -> None:
        """Send what waits now (from the caller's thread: at exit)."""
        with self._cond:
            batch = self._take()
        if batch:
            self._send(batch)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(2)

    def _take(self) -> list[tuple]:
        batch, self._items = self._items, []
        for kind, counter in self._counts.items():
            if counter:
                batch.append(("counts", kind, dict(counter)))
        self._counts = {}
        return batch

    def _run(self) -> None:
        import time

        while True:
            with self._cond:
                while not self._items and not any(self._counts.values()) and not self._closed:
                    self._cond.wait()
                if self._closed and not self._items and not any(self._counts.values()):
                    return
            time.sleep(self.interval)  # let more gather: one message for everything of the next few ms
            with self._cond:
                batch = self._take()
            if batch and not self._send(batch):
                return

    def _send(self, batch: list[tuple]) -> bool:
        try:
            data = dumps(batch)
            with self._send_lock:
                self._conn.send_bytes(data)
            return True
        except (OSError, ValueError, BrokenPipeError):
            if self._on_broken is not None:
                self._on_broken()
            return False
