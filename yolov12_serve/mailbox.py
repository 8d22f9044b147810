"""A stream's mailbox: a camera's holds one frame and the newest wins (an old frame is worth nothing once a new one
exists); a push call's holds its small window of frames in order (the client is paced, nothing is replaced).

Not locked on its own: the device scheduler that owns the mailbox guards it with its lock.
"""

from __future__ import annotations

from collections import deque

from .frames import Frame

__all__ = ["Mailbox"]


class Mailbox:
    """Up to `capacity` frames, oldest first; `put` beyond capacity evicts and returns the oldest ("superseded")."""

    __slots__ = ("_frames", "capacity")

    def __init__(self, capacity: int = 1) -> None:
        self.capacity = max(1, int(capacity))
        self._frames: deque[Frame] = deque()

    def put(self, frame: Frame) -> Frame | None:
        """Store `frame`; return the frame it evicted, if any."""
        self._frames.append(frame)
        return self._frames.popleft() if len(self._frames) > self.capacity else None

    def peek(self) -> Frame | None:
        """The next frame to run, without taking it."""
        return self._frames[0] if self._frames else None

    def take(self) -> Frame | None:
        """Remove and return the next frame to run."""
        return self._frames.popleft() if self._frames else None

    def __len__(self) -> int:
        return len(self._frames)
