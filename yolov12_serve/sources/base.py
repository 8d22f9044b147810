"""The contract between a source and its stream: a source pushes letterboxed frames and state changes into a sink."""

from __future__ import annotations

import enum
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol

import numpy as np

from engines.letterbox import Letterbox

from ..frames import now

__all__ = ["FrameSink", "Source", "StreamState"]


class StreamState(enum.IntEnum):
    """Life of a stream (values equal the proto's StreamState numbers)."""

    CONNECTING = 1
    STREAMING = 2
    RECONNECTING = 3
    STOPPED = 4
    FAILED = 5


class FrameSink(Protocol):
    """What a source writes into (implemented by `stream.Stream`)."""

    stream_id: str
    max_fps: float

    def plan(self, src_hw: tuple[int, int]) -> Letterbox:
        """The letterbox for frames of this source size on the stream's current device."""
        ...

    def admit(self, t: float) -> bool:
        """Should the frame that came at `t` be prepared and handed over? False under overload while the stream's
        turn is far (the sink counted this one as offered and dropped); the source still counts it as arrived."""
        ...

    def shed_ahead(self, period: float) -> int:
        """After `admit` said no, for a source that makes its own frames every `period` s: how many of the next ones
        would be shed too (the sink counted them as offered and dropped); the source skips them."""
        ...

    def put(self, image: np.ndarray | Callable[..., np.ndarray], letterbox: Letterbox, capture_time_us: int) -> None:
        """Hand over one letterboxed frame, or the call that letterboxes it (run only if the frame reaches an
        engine, as `call(out=None)`: given `out`, its place in a batch array, it writes there and returns it);
        the stream numbers it and sends it to the scheduler."""
        ...

    def set_state(self, state: StreamState, error: str = "") -> None:
        """Report a state change (and the error that caused it)."""
        ...

    def count_reconnect(self) -> None:
        """Count one reconnect attempt."""
        ...

    def count_corrupt(self) -> None:
        """Count one video packet the decoder rejected as corrupt (skipped on its connection, no reconnect)."""
        ...

    def note_decoder(self, decoder: str) -> None:
        """Where its video is decoded from now on, 'cpu' or 'nvdec' (told when it changes; ListStreams shows it)."""
        ...


class Source(ABC):
    """A producer of frames for one stream, running in its own thread."""

    kind = "source"
    watchdog = False  # True: the server restarts it when STREAMING without frames for too long

    def __init__(self, sink: FrameSink) -> None:
        self.sink = sink
        self.last_frame_at = now()
        self._stopped = threading.Event()

    @abstractmethod
    def start(self) -> None:
        """Begin producing frames in the background."""

    def stop(self) -> None:
        """Stop producing; the thread ends on its own shortly (it never blocks the caller)."""
        self._stopped.set()

    def restart(self, reason: str) -> None:  # noqa: B027 - only sources with a watchdog need it
        """Abandon the current connection and connect again (the watchdog calls this on a stall)."""

    @property
    def stopped(self) -> bool:
        """True once `stop()` was called."""
        return self._stopped.is_set()
