"""Evidence pictures (--evidence-dir): a JPEG of every object a tracked camera counts, its box drawn, with a JSON
record beside it (the model version that found it included), for the quality record ("show me each defect of the
last shift").

When a camera's tracker confirms objects, the camera's next picture is asked for (GetSnapshot's way: only then does
a frame cost more than a flag test, in one process or a device process) with the number of the frame it shows;
when that frame's result is published, the boxes of those objects in it are drawn and the files written by one
thread of their own, never in the publishing path. An object missing from that frame (a flicker) is asked for
again, up to `ATTEMPTS` times. The folder is kept under `max_bytes` and within the disk's space, oldest files
removed first.

Files: DIR/<camera>/<UTC capture time>_<class>_<track id>.jpg and .json (camera and class names made safe for
file names).
"""

from __future__ import annotations

import collections
import errno
import io
import json
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .faultlog import FaultLog
from .frames import FrameResult

__all__ = ["ATTEMPTS", "EvidenceFolder", "EvidenceRecorder", "Picture"]

log = logging.getLogger(__name__)

ATTEMPTS = 3  # pictures asked for an object before it is skipped (it left the frame, or flickers)
RECENT = 16  # results kept per camera while its picture is on the way (the result may come first)
QUEUE = 64  # pictures waiting to be written; more are skipped ("busy") rather than held in memory


@dataclass(frozen=True)
class Picture:
    """A camera's picture as JPEG and the frame it is (Stream.put's frame id)."""

    jpeg: bytes
    frame_id: int


def safe_name(text: str) -> str:
    """`text` for a file name: letters, digits, '.', '-' and '_' kept, anything else '_' (no '..' or '/')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".") or "_"


class EvidenceFolder:
    """The folder's files, oldest first, kept under `max_bytes` in all (counted at start, then as written)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root, self.max_bytes = root, max_bytes
        root.mkdir(parents=True, exist_ok=True)
        found = sorted((p.stat().st_mtime, p) for p in root.rglob("*") if p.suffix in (".jpg", ".json"))
        self._files: collections.deque[tuple[Path, int]] = collections.deque((p, p.stat().st_size) for _, p in found)
        self.bytes = sum(size for _, size in self._files)
        self._warned_at = -math.inf  # when a full disk was last logged

    def write(self, path: Path, data: bytes) -> None:
        """Write `data` to `path` (under the root; whole or not at all), then remove the oldest files over the cap.
        A full disk (the cap above the space there is) is a cap too: the oldest files make room, as a recorder
        overwrites its oldest footage, so the newest defects are the ones kept."""
        try:
            self._write_whole(path, data)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not self._make_room(len(data)):
                raise
            self._write_whole(path, data)
        self._files.append((path, len(data)))
        self.bytes += len(data)
        while self.bytes > self.max_bytes and len(self._files) > 1:
            old, size = self._files.popleft()
            self.bytes -= size
            old.unlink(missing_ok=True)

    def _write_whole(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        try:
            part.write_bytes(data)
            part.replace(path)
        except OSError:
            part.unlink(missing_ok=True)  # a full disk leaves no half file behind
            raise

    def _make_room(self, size: int) -> bool:
        """The disk is full: remove the oldest files, at least twice `size` and a twentieth of the folder (room for
        the next writes too, and for the server's state files on the same disk). False: nothing left to remove."""
        goal, freed, removed = max(2 * size, self.bytes // 20), 0, 0
        while freed < goal and self._files:
            old, old_size = self._files.popleft()
            self.bytes -= old_size
            old.unlink(missing_ok=True)
            freed, removed = freed + old_size, removed + 1
        now = time.monotonic()
        if removed and now >= self._warned_at + 60:  # a disk that another program keeps full: a line a minute
            self._warned_at = now
            log.warning("evidence: the disk under %s is full: removed the %d oldest files (%.1f MB) to write new "
                        "ones; set --evidence-max-mb below the space the disk has for evidence (now %.0f MB in the "
                        "folder)", self.root, removed, freed / 1e6, self.bytes / 1e6)
        return removed > 0


@dataclass
class _Wanted:
    class_id: int
    attempts: int = 0


@dataclass
class _Job:
    stream_id: str
    picture: Picture
    result: FrameResult
    rows: list[int]  # the rows of result.detections to draw and record
    names: Mapping[int, str]


class EvidenceRecorder:
    """Pictures of newly counted objects: `objects()` when a camera confirms some, `result()` for every published
    result of a camera with a picture on the way (`pending` says which: a set, tested per result)."""

    def __init__(self, folder: EvidenceFolder, take_picture: Callable[[str], Picture | None],
                 on_written: Callable[[], None] = lambda: None,
                 on_skipped: Callable[[str, int], None] = lambda reason, n: None) -> None:
        self.folder = folder
        self.pending: set[str] = set()  # cameras with objects waiting for their picture
        self._take = take_picture
        self._on_written, self._on_skipped = on_written, on_skipped
        # a full disk fails every picture (a line per counted object): logged on change, the counter counts each
        self._write_faults = FaultLog(log, "evidence under %s", (folder.root,))
        self._lock = threading.Lock()
        self._wanted: dict[str, dict[int, _Wanted]] = {}  # camera -> track id -> what is known of it
        self._asking: set[str] = set()  # cameras whose picture is being taken
        self._pictures: dict[str, Picture] = {}  # camera -> its picture, waiting for that frame's result
        self._recent: dict[str, collections.deque[FrameResult]] = {}
        self._names: dict[str, Mapping[int, str]] = {}
        self._generation: dict[str, int] = {}  # bumped when a camera is forgotten: a picture asked before is stale
        self._jobs: queue.Queue[_Job | None] = queue.Queue(QUEUE)
        self._writer = threading.Thread(target=self._write_all, name="evidence", daemon=True)
        self._writer.start()

    def objects(self, stream_id: str, track_ids: list[int], class_ids: list[int], names: Mapping[int, str]) -> None:
        """A camera confirmed these objects: their picture is asked for (one request per camera at a time)."""
        with self._lock:
            wanted = self._wanted.setdefault(stream_id, {})
            for tid, cls in zip(track_ids, class_ids, strict=True):
                wanted[tid] = _Wanted(cls)
            self._names[stream_id] = names
            self.pending.add(stream_id)
            self._ask(stream_id)

    def result(self, result: FrameResult) -> None:
        """A published result of a camera in `pending`: the one its picture shows is drawn."""
        sid = result.stream_id
        with self._lock:
            picture = self._pictures.get(sid)
            if picture is None:
                if sid in self._asking:  # the picture comes after its result now and then: keep a few
                    self._recent.setdefault(sid, collections.deque(maxlen=RECENT)).append(result)
                return
            self._match(sid, picture, result)

    def forget(self, stream_id: str) -> None:
        """A camera was removed: nothing more of it is recorded (a picture on the way is dropped)."""
        with self._lock:
            self._forget(stream_id)

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued within `timeout` seconds, then stop the writer. A writer held up by a slow or hung
        disk is left behind (a daemon thread: it ends with the process) and what it had not written is logged, so
        a drain never waits on the disk."""
        end, marked = time.monotonic() + timeout, True
        try:
            self._jobs.put(None, timeout=timeout)
        except queue.Full:  # the queue full and the writer stuck
            marked = False
        self._writer.join(max(0.0, end - time.monotonic()))
        if self._writer.is_alive():
            log.warning("evidence: the writer is still busy after %.0f s (a slow or hung disk under %s?): the picture "
                        "it is writing and %d queued not written", timeout, self.folder.root,
                        max(0, self._jobs.qsize() - marked))

    # ---------------------------------------------------------------------------------------------- (lock held)
    def _ask(self, sid: str) -> None:
        if sid not in self._asking and sid not in self._pictures and self._wanted.get(sid):
            self._asking.add(sid)
            threading.Thread(target=self._picture_of, args=(sid, self._generation.get(sid, 0)), name=f"evidence {sid}",
                             daemon=True).start()

    def _match(self, sid: str, picture: Picture, result: FrameResult) -> None:
        if result.frame_id < picture.frame_id:
            return
        del self._pictures[sid]
        wanted = self._wanted.get(sid, {})
        rows: list[int] = []
        if result.frame_id == picture.frame_id and result.track_ids is not None:
            rows = [i for i, tid in enumerate(result.track_ids.tolist()) if tid in wanted]
            for i in rows:
                del wanted[int(result.track_ids[i])]
        # the rest: not in that frame (a flicker, or it left), or the frame was never published (dropped): again
        for tid in [tid for tid, w in wanted.items() if w.attempts >= ATTEMPTS]:
            del wanted[tid]
            self._on_skipped("not in its pictures", 1)
        if rows:
            job = _Job(sid, picture, result, rows, self._names.get(sid, {}))
            try:
                self._jobs.put_nowait(job)
            except queue.Full:
                self._on_skipped("busy", len(rows))
        if wanted:
            self._ask(sid)
        else:
            self._forget(sid)

    def _forget(self, sid: str) -> None:
        self._generation[sid] = self._generation.get(sid, 0) + 1  # (removed and added again: its frames count anew)
        self._asking.discard(sid)
        self._wanted.pop(sid, None)
        self._pictures.pop(sid, None)
        self._recent.pop(sid, None)
        self._names.pop(sid, None)
        self.pending.discard(sid)

    # ---------------------------------------------------------------------------------------------- threads
    def _picture_of(self, sid: str, generation: int) -> None:
        try:
            picture = self._take(sid)
            error = "" if picture is not None else "no frame came"
        except Exception as e:  # the camera was removed, is down, or its picture cannot be made
            picture, error = None, f"{type(e).__name__}: {e}"
        with self._lock:
            if self._generation.get(sid, 0) != generation:
                return  # the camera was removed meanwhile (and maybe added again, asking afresh)
            self._asking.discard(sid)
            wanted = self._wanted[sid]
            for w in wanted.values():
                w.attempts += 1
            if picture is None:
                log.info("evidence of %s: no picture (%s)", sid, error)
                self._on_skipped("no picture", len(wanted))
                self._forget(sid)
                return
            self._pictures[sid] = picture
            for result in self._recent.pop(sid, ()):
                if sid not in self._pictures:
                    break
                self._match(sid, picture, result)

    def _write_all(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._write(job)
            except Exception as e:  # a full disk must not stop the server: counted, logged on change
                why = e.strerror if isinstance(e, OSError) and e.strerror else e  # one reason, not one per file
                self._write_faults.failed(f"{job.stream_id}'s pictures not written: {type(e).__name__}: {why}")
                self._on_skipped("write failed", len(job.rows))
            else:
                self._write_faults.ok("written again")

    def _write(self, job: _Job) -> None:
        from .drawing import draw_boxes

        r = job.result
        image = np.asarray(Image.open(io.BytesIO(job.picture.jpeg)).convert("RGB"))
        at = r.capture_time_us / 1e6 if r.capture_time_us else time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(at)) + f".{int(at * 1000) % 1000:03d}Z"
        folder = self.folder.root / safe_name(job.stream_id)
        for row in job.rows:  # a picture per object, its own box drawn
            det, tid = r.detections[row], int(r.track_ids[row])
            out = io.BytesIO()
            Image.fromarray(draw_boxes(image, det[None], dict(job.names), ids=np.array([tid]))).save(
                out, format="JPEG", quality=90)
            cls = job.names.get(int(det[5]), str(int(det[5])))
            stem = f"{stamp}_{safe_name(cls)}_{tid}"
            record = {"stream_id": job.stream_id, "track_id": tid, "class_name": cls, "class_id": int(det[5]),
                      "score": round(float(det[4]), 4), "box": [round(float(v), 1) for v in det[:4]],
                      "frame_id": r.frame_id, "capture_time_us": r.capture_time_us, "width": r.src_hw[1],
                      "height": r.src_hw[0], "model_version": r.model_version, "picture": f"{stem}.jpg"}
            self.folder.write(folder / f"{stem}.jpg", out.getvalue())
            self.folder.write(folder / f"{stem}.json", json.dumps(record, indent=1).encode())
            self._on_written()
