"""`ShardedClient`: one client for the replicas of a sharded deployment (`--shard-count N`), routing by camera id.

Replica `i` of the address list must run with `--shard-index i` (a StatefulSet's pod `NAME-i`). Calls about one
camera (AddStream, RemoveStream, its info, Watch) go to the replica that owns it, computed here with the same
rendezvous hash as the servers (sharding.py); ListStreams and a Watch of several cameras fan out and merge.

    from yolov12_serve.routing import ShardedClient
    with ShardedClient.for_statefulset("yolov12-serve", replicas=3, namespace="plant") as fleet:
        fleet.add_stream("line1-cam1", "rtsp://10.0.0.5/stream1")      # sent to the camera's owner
        for fd in fleet.watch(["line1-cam1", "line2-cam4"]):           # merged from their owners
            print(fd.stream_id, fd.frame_id, len(fd.detections))
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc

from .client import Client
from .proto import detector_pb2 as pb
from .sharding import owner

__all__ = ["MergedWatch", "ShardedClient"]


class MergedWatch:
    """Several WatchDetections calls read into one iterator (a thread per call); `cancel()` ends them all.

    Results of each replica keep their order; across replicas they interleave as they arrive. The first call
    that fails with anything but CANCELLED ends the iteration with its RpcError."""

    _END = object()

    def __init__(self, watches: Sequence[Any]) -> None:
        self._watches = list(watches)
        self._queue: queue.Queue = queue.Queue(maxsize=256)
        self._open = len(self._watches)
        self._cancelled = False
        self._threads = [threading.Thread(target=self._pump, args=(w,), name="merged-watch", daemon=True)
                         for w in self._watches]
        for t in self._threads:
            t.start()

    def _pump(self, watch: Any) -> None:
        try:
            for item in watch:
                self._queue.put(item)
        except grpc.RpcError as e:
            if not self._cancelled:
                self._queue.put(e)
        finally:
            self._queue.put(self._END)

    def __iter__(self) -> MergedWatch:
        return self

    def __next__(self) -> pb.FrameDetections:
        while self._open:
            item = self._queue.get()
            if item is self._END:
                self._open -= 1
                continue
            if isinstance(item, grpc.RpcError):
                self.cancel()
                raise item
            return item
        raise StopIteration

    def cancel(self) -> bool:
        """Cancel every call (the iterator then ends)."""
        self._cancelled = True
        return all([w.cancel() for w in self._watches])


class ShardedClient:
    """Clients for replicas 0..N-1 (`addresses[i]` runs `--shard-index i --shard-count N`), routing by camera id.
    `client_kwargs` go to every replica's Client: timeout, and TLS and token (tls_ca, cert, key, token, ...)."""

    def __init__(self, addresses: Sequence[str], **client_kwargs: Any) -> None:
        if not addresses:
            raise ValueError("ShardedClient needs the address of every replica, in shard order")
        self.addresses = list(addresses)
        self.clients = [Client(a, **client_kwargs) for a in self.addresses]

    @classmethod
    def for_statefulset(cls, name: str, replicas: int, namespace: str = "default", port: int = 50051,
                        service: str | None = None, **client_kwargs: Any) -> ShardedClient:
        """The replicas of a StatefulSet `name` behind its headless Service (`service`, default `name`), by the
        stable DNS names Kubernetes gives them: NAME-i.SERVICE.NAMESPACE.svc:PORT."""
        svc = service or name
        return cls([f"{name}-{i}.{svc}.{namespace}.svc:{port}" for i in range(replicas)], **client_kwargs)

    @property
    def shard_count(self) -> int:
        """How many replicas share the cameras."""
        return len(self.clients)

    def owner(self, stream_id: str) -> int:
        """The shard (index into `addresses`) that serves `stream_id`."""
        return owner(stream_id, self.shard_count)

    def client_for(self, stream_id: str) -> Client:
        """The client of the replica that serves `stream_id`."""
        return self.clients[self.owner(stream_id)]

    def add_stream(self, stream_id: str, url: str, max_fps: float = 0.0, min_score: float = 0.0,
                   classes: Sequence[str] = (), zone: Sequence[tuple[float, float]] = (),
                   blind_after_s: float | None = None, track: bool = False,
                   class_min_scores: Mapping[str, float] | None = None) -> pb.StreamInfo:
        """AddStream on the camera's owner."""
        return self.client_for(stream_id).add_stream(stream_id, url, max_fps, min_score, classes, zone, blind_after_s,
                                                     track, class_min_scores)

    def remove_stream(self, stream_id: str) -> pb.StreamInfo:
        """RemoveStream on the camera's owner."""
        return self.client_for(stream_id).remove_stream(stream_id)

    def stream(self, stream_id: str) -> pb.StreamInfo | None:
        """One camera's info from its owner, or None when it is not registered there."""
        return self.client_for(stream_id).stream(stream_id)

    def snapshot(self, stream_id: str) -> pb.Snapshot:
        """GetSnapshot on the camera's owner."""
        return self.client_for(stream_id).snapshot(stream_id)

    def list_streams(self) -> list[pb.StreamInfo]:
        """Every replica's streams, by id."""
        return sorted((s for c in self.clients for s in c.list_streams()), key=lambda s: s.stream_id)

    def watch(self, stream_ids: Iterable[str] = (), timeout: float | None = None, follow: bool = False,
              on_gap: Callable[[str], None] | None = None) -> Any:
        """Detections of these cameras from their owners (all cameras of every replica when empty), merged;
        `follow`: each replica's watch goes on through its restarts (`on_gap` hears "ADDRESS: ...")."""
        ids = list(dict.fromkeys(stream_ids))
        by_shard: dict[int, list[str]] = {}
        for sid in ids:
            by_shard.setdefault(self.owner(sid), []).append(sid)
        wanted = sorted(by_shard.items()) if ids else [(shard, []) for shard in range(len(self.clients))]

        def one(shard: int, mine: list[str]) -> Any:
            told = None if on_gap is None else (lambda text, a=self.addresses[shard]: on_gap(f"{a}: {text}"))
            return self.clients[shard].watch(mine, timeout, follow=follow, on_gap=told)

        if len(wanted) == 1 and ids:
            return one(*wanted[0])
        return MergedWatch([one(shard, mine) for shard, mine in wanted])

    def health(self) -> dict[str, str]:
        """Each replica's health ('SERVING', ..., or the gRPC code name when it cannot be reached)."""
        out = {}
        for address, c in zip(self.addresses, self.clients):
            try:
                out[address] = c.health()
            except grpc.RpcError as e:
                out[address] = e.code().name
        return out

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until every replica is SERVING; TimeoutError otherwise."""
        for c in self.clients:
            c.wait_ready(timeout)

    def close(self) -> None:
        """Close every channel."""
        for c in self.clients:
            c.close()

    def __enter__(self) -> ShardedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
