"""Choose the source class for a stream URL (the only place that maps URL kinds to source classes)."""

from __future__ import annotations

from ..config import RtspOptions
from .base import FrameSink, Source

__all__ = ["make_source"]


def make_source(kind: str, sink: FrameSink, url: str, options: RtspOptions) -> Source:
    """A source for `url` of `kind` ('rtsp', 'file', 'synthetic'), feeding `sink`; ValueError for other kinds."""
    if kind in ("rtsp", "file"):
        from .rtsp import AvSource

        path = url[len("file://"):] if url.startswith("file://") else url
        return AvSource(sink, path if kind == "file" else url, options, is_file=kind == "file")
    if kind == "synthetic":
        from .synthetic import SyntheticSource

        return SyntheticSource(sink, url)
    raise ValueError(f"no source for url kind {kind!r}")
