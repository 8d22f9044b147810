"""The command line's cameras (`--streams FILE`, `--source URL`) applied again on SIGHUP, as `systemctl reload`
and `kill -HUP` reload a server's configuration: the file is read again (its `credentials:` files and URLs too) and
the running cameras that came from it become the file's. New entries are added, changed ones replaced (a changed
password too: compared here in full, where `yolov12-ctl apply` sees URLs masked), and entries taken out removed.
Cameras added over gRPC are left alone; a file that cannot be read or checked changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .config import StreamSpec
from .errors import ServerError

if TYPE_CHECKING:
    from .core import ServerCore

__all__ = ["ListChange", "apply_camera_list"]

log = logging.getLogger(__name__)


@dataclass
class ListChange:
    """What applying the camera list did, by stream id."""

    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # could not be added (or replaced): logged with why
    unchanged: int = 0

    def describe(self) -> str:
        """One line for the log: 'cam9 added; cam2 changed; 7 unchanged'."""
        parts = [f"{', '.join(ids)} {what}" for ids, what in ((self.added, "added"), (self.replaced, "changed"),
                                                              (self.removed, "removed"), (self.refused, "refused"))
                 if ids]
        return "; ".join([*parts, f"{self.unchanged} unchanged"])


def apply_camera_list(core: ServerCore, wanted: Sequence[StreamSpec]) -> ListChange:
    """Make the command line's running cameras those of `wanted` (the list read again, this replica's share).
    Removals first (they free --max-streams room), then replacements, then additions. A replacement the server
    refuses puts the running camera back as it was; an id that a camera added over gRPC holds is not taken."""
    have = core.listed_specs()
    want = {spec.stream_id: spec for spec in wanted}
    change = ListChange()
    for sid in sorted(set(have) - set(want)):
        if _removed(core, sid):
            change.removed.append(sid)
    for sid, spec in want.items():
        old = have.get(sid)
        if old is None or old == spec:
            change.unchanged += old is not None
            continue
        try:
            core.check_spec(spec)  # refused before the running camera is touched
        except ServerError as e:
            log.error("stream %s of the camera list cannot be changed (the running camera is kept): %s", sid, e)
            change.refused.append(sid)
            continue
        if not _removed(core, sid) and core.has_stream(sid):
            continue
        if _added(core, spec):
            change.replaced.append(sid)
        else:
            change.refused.append(sid)
            if _added(core, old):
                log.warning("stream %s: the running camera was kept as it was", sid)
    for sid, spec in want.items():
        if sid in have:
            continue
        if core.has_stream(sid):
            log.warning("stream %s is in the camera list but a stream added over gRPC has its id: that one is kept "
                        "(remove it, e.g. yolov12-ctl remove %s, and send SIGHUP again to take the list's)", sid, sid)
            change.refused.append(sid)
        elif _added(core, spec):
            change.added.append(sid)
        else:
            change.refused.append(sid)
    return change


def _added(core: ServerCore, spec: StreamSpec) -> bool:
    try:
        core.add_stream(spec, persist=False, listed=True)
    except ServerError as e:
        log.error("stream %s of the camera list cannot be added: %s", spec.stream_id, e)
        return False
    return True


def _removed(core: ServerCore, stream_id: str) -> bool:
    try:
        core.remove_stream(stream_id, by_list=True)
    except ServerError as e:  # removed, or removed and added again, over gRPC meanwhile: not the list's to remove
        log.info("stream %s of the camera list: %s", stream_id, e)
        return False
    return True
