"""Which replica serves which camera: rendezvous (highest-random-weight) hashing of stream ids over shard ordinals.

Every replica of a scaled-out deployment (a Kubernetes StatefulSet: pods `NAME-0` .. `NAME-{N-1}`) runs with
`--shard-index I --shard-count N` and serves only the cameras whose ids hash to it. Each camera has exactly one
owner, every replica and client computes it alone (no coordination), and going from N to N+1 replicas moves
only the cameras the new replica wins: about 1/(N+1) of them, all to the new replica.

    owner("line1-cam7", 3)                  # -> 0, 1 or 2, the same on every machine and Python version
    ShardSpec.resolve(None, 3, "yolov12-serve-2").index   # -> 2 (the ordinal of a StatefulSet pod's name)
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["ShardSpec", "owner", "pod_ordinal", "weight"]

_ORDINAL = re.compile(r"-(\d+)$")


def weight(stream_id: str, shard: int) -> int:
    """The hash weight of `stream_id` on `shard`: 64 bits of BLAKE2b, stable across processes (unlike hash())."""
    digest = hashlib.blake2b(f"{shard}\x00{stream_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(stream_id: str, shard_count: int) -> int:
    """The shard (0 .. shard_count-1) that serves `stream_id`: the one of highest weight (ties: lowest index)."""
    if shard_count < 1:
        raise ValueError(f"shard_count must be at least 1, got {shard_count}")
    if shard_count == 1:
        return 0
    return max(range(shard_count), key=lambda s: (weight(stream_id, s), -s))


def pod_ordinal(name: str) -> int | None:
    """The ordinal of a StatefulSet pod name (`yolov12-serve-3` -> 3), or None when the name has none."""
    m = _ORDINAL.search(name.strip())
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class ShardSpec:
    """This replica's shard: `index` of `count` (count 1: one server owns every camera)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError(f"--shard-count must be at least 1, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ConfigError(f"--shard-index must be 0..{self.count - 1} for --shard-count {self.count}, "
                              f"got {self.index}")

    @classmethod
    def resolve(cls, index: int | None, count: int | None, pod_name: str | None = None) -> ShardSpec:
        """From the command line; an absent index is read from the pod name's ordinal (`POD_NAME`, else the host
        name, which a StatefulSet sets to the pod name). ConfigError when it cannot be found."""
        count = 1 if count is None else count
        if index is None and count > 1:
            name = pod_name if pod_name is not None else os.environ.get("POD_NAME") or socket.gethostname()
            index = pod_ordinal(name)
            if index is None:
                raise ConfigError(f"--shard-count {count} without --shard-index, and the pod name {name!r} ends in "
                                  "no ordinal (NAME-N): pass --shard-index, or set POD_NAME")
        return cls(index or 0, count)

    def owns(self, stream_id: str) -> bool:
        """True when this replica serves `stream_id`."""
        return self.count == 1 or owner(stream_id, self.count) == self.index

    def owner(self, stream_id: str) -> int:
        """The shard that serves `stream_id`."""
        return owner(stream_id, self.count)

    def __str__(self) -> str:
        return f"shard {self.index} of {self.count}"
