"""The acknowledged stream set, kept across restarts (`--state-dir`, default under the user's state directory).

Every camera added over gRPC is written down before its AddStream is answered OK, and forgotten when it is
removed; on start the server adds them again. Files are replaced atomically (written to a temporary file,
fsynced, renamed over the old one, the folder fsynced), so a kill -9 at any moment leaves the previous set or
the new one, whole: every stream whose AddStream was answered OK is in it.

Credentials stay out of the stream list: `streams.json` holds the URLs with passwords masked (as ListStreams
shows them); the URLs that carry a password are kept whole in `credentials.json`, readable by the server's user
only (mode 0600, folder 0700), and written first, so a stream listed always has its credentials beside it.
Streams given on the command line (--source, --streams) are not kept: the command line brings them back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .config import StreamSpec, redact_url
from .errors import ConfigError, InvalidArgumentError

__all__ = ["CREDENTIALS_FILE", "STREAMS_FILE", "StreamStore", "default_state_dir", "nearest_folder"]

log = logging.getLogger(__name__)

STREAMS_FILE = "streams.json"
CREDENTIALS_FILE = "credentials.json"
FORMAT = 1


def _short(x: float) -> float:
    """A number as the client meant it: gRPC's floats are 32-bit, so 0.4 arrives as 0.4000000059604645."""
    return float(f"{float(x):.7g}")


def default_state_dir() -> Path:
    """$XDG_STATE_HOME/yolov12-serve, else ~/.local/state/yolov12-serve (the XDG base directory default)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "yolov12-serve"


def nearest_folder(folder: str | Path, flag: str) -> Path:
    """The folder itself, or the nearest one above it that exists (where it would be created); ConfigError when
    that is a file, so `--state-dir /etc/passwd/x` says so instead of "Not a directory" (start and --check alike)."""
    existing = Path(folder).expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag} {folder}: {existing} is a file, not a folder")
    return existing


def _write_atomically(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace `path` with `text` so that a crash at any moment leaves the old file or the new one, whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself reaches the disk
    finally:
        os.close(folder)


class StreamStore:
    """The stream set in one folder: `load()` at start, `save(specs)` after every change (thread-safe)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._credentials: dict[str, str] | None = None  # as last written (skip rewriting it unchanged)

    @property
    def streams_path(self) -> Path:
        return self.folder / STREAMS_FILE

    @property
    def credentials_path(self) -> Path:
        return self.folder / CREDENTIALS_FILE

    def open(self) -> None:
        """Create the folder (0700) and check it can be written; ConfigError saying how to fix it otherwise."""
        nearest_folder(self.folder, "--state-dir")
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            probe = self.folder / f".probe.{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"cannot keep the stream set in {self.folder}: {e.strerror or e}; pick a writable "
                              "folder with --state-dir, or run without persistence with --no-state") from None

    def load(self) -> list[StreamSpec]:
        """The saved streams, passwords restored (empty when nothing was saved yet); ConfigError for a file that
        cannot be read. A file that is not one of ours any more (never left half-written, but a hand edit or a
        failing disk can break it) is set aside and logged, and a malformed entry is logged and left out: the
        command line's cameras start all the same (refused, a plant's every camera stayed blind)."""
        streams = self._read(self.streams_path)
        credentials = self._read(self.credentials_path)
        self._credentials = dict(credentials.get("urls", {})) if credentials else {}
        specs = []
        for item in streams.get("streams", []) if streams else []:
            try:
                sid, url, max_fps = str(item["id"]), str(item["url"]), float(item.get("max_fps", 0.0))
                min_score = float(item.get("min_score", 0.0))
                classes = tuple(str(c) for c in item.get("classes", ()))
                zone = tuple((float(x), float(y)) for x, y in item.get("zone", ()))
                blind_after_s = None if item.get("blind_after_s") is None else float(item["blind_after_s"])
                track = bool(item.get("track", False))
                class_scores = tuple((str(k), float(v)) for k, v in item.get("class_min_scores", {}).items())
            except (KeyError, TypeError, ValueError, AttributeError):
                log.error("%s: malformed entry %r left out (its camera is not restored: add it again)",
                          self.streams_path, item)
                continue
            full = self._credentials.get(sid)
            if full is not None and redact_url(full) == url:
                url = full
            elif "***" in url:
                log.warning("stream %s: its credentials are missing from %s; it is added with the masked URL",
                            sid, self.credentials_path)
            try:
                specs.append(StreamSpec(sid, url, max_fps, min_score, classes, zone, blind_after_s, track,
                                        class_scores))
            except InvalidArgumentError as e:
                log.error("%s: entry %s left out (%s): add its camera again", self.streams_path, sid, e)
        return specs

    def _read(self, path: Path) -> dict | None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            why = f"not valid JSON ({e.msg} at line {e.lineno})"
        else:
            if isinstance(doc, dict) and doc.get("format") == FORMAT:
                return doc
            why = f"not a yolov12-serve state file of format {FORMAT}"
        kept = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            path.rename(kept)
        except OSError as e:
            raise ConfigError(f"{path} is {why} and cannot be set aside ({e.strerror or e}); fix or remove it (or "
                              "start with --no-state)") from None
        log.error("%s was %s: set aside as %s; starting without what it held (the streams it lists are not "
                  "restored: add them again, e.g. yolov12-ctl apply)", path, why, kept.name)
        return None

    def save(self, snapshot: Callable[[], list[StreamSpec]]) -> None:
        """Write the stream set `snapshot()` returns, taken under this store's lock (so that of two saves at once
        the later state is written last); OSError when the disk refuses. A stream listed always has its
        credentials written: new ones go first, dropped ones after the list."""
        with self._lock:
            specs = snapshot()
            credentials = {s.stream_id: s.url for s in specs if redact_url(s.url) != s.url}
            streams = [{"id": s.stream_id, "url": redact_url(s.url), "max_fps": _short(s.max_fps),
                        "min_score": _short(s.min_score), "classes": list(s.classes),
                        "zone": [[_short(x), _short(y)] for x, y in s.zone],
                        "blind_after_s": None if s.blind_after_s is None else _short(s.blind_after_s),
                        "track": s.track, "class_min_scores": {k: _short(v) for k, v in s.class_min_scores}}
                       for s in specs]
            old = self._credentials or {}
            if any(old.get(k) != v for k, v in credentials.items()):
                self._write_credentials({**old, **credentials})
            _write_atomically(self.streams_path, json.dumps({"format": FORMAT, "streams": streams}, indent=1) + "\n")
            if self._credentials != credentials:
                self._write_credentials(credentials)

    def _write_credentials(self, urls: dict[str, str]) -> None:
        _write_atomically(self.credentials_path, json.dumps({"format": FORMAT, "urls": urls}, indent=1,
                                                            sort_keys=True) + "\n")
        self._credentials = urls
