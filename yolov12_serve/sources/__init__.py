"""Where frames come from: cameras the server pulls (RTSP/files via PyAV, synthetic demo cameras) and pushed frames.

A pulled source runs in its own thread, decodes, letterboxes (in that thread) and hands frames to its
stream (a `FrameSink`); the stream puts them in the device scheduler's mailbox.
"""

from .base import FrameSink, Source, StreamState
from .factory import make_source

__all__ = ["FrameSink", "Source", "StreamState", "make_source"]
