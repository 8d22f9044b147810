"""Hot engine swap (a part of `ServerCore`, kept apart for its size): ReloadEngines and SIGHUP load the engine files
beside the running ones, warm them up, switch every device between two batches and free the old engines once
their last batch ends; a file that cannot serve is refused and every running engine kept (all devices switch, or
none).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from typing import TYPE_CHECKING

from .errors import FailedPreconditionError, InvalidArgumentError
from .frames import now
from .health import Verdict
from .procs import RemoteRuntime
from .runtime import LoadedEngine, load_engine, release_freed_memory

if TYPE_CHECKING:
    from .config import ServerConfig
    from .core import ServerInfoView
    from .placement import Placement
    from .runtime import DeviceRuntime, EngineLoader
    from .supervisor import RunDeadline, RunSupervisor

__all__ = ["EngineSwap", "check_engine_path", "engine_files_signature"]

log = logging.getLogger("yolov12_serve.core")


def engine_files_signature(paths: list[str]) -> tuple:
    """What tells an engine file replaced or rewritten since it was read, without reading it (an engine is hundreds
    of MB): its size, inode, and modification and change times (no copy keeps the change time)."""
    signature = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            signature.append((path, None))
            continue
        signature.append((path, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(signature)


class EngineSwap:
    """The hot-swap half of ServerCore (a mixin: it works on the core's devices and locks)."""

    if TYPE_CHECKING:  # what it uses of ServerCore
        config: ServerConfig
        runtimes: dict[str, DeviceRuntime]
        placement: Placement
        supervisor: RunSupervisor
        deadline: RunDeadline
        loader: EngineLoader
        _failover_lock: threading.Lock
        _reload_lock: threading.Lock
        _names: dict[str, dict[int, str]]
        _stop: threading.Event
        _loaded_files: tuple

        def _check_serving(self) -> None: ...
        def _threads_per_instance(self) -> int | None: ...
        def _recover(self, rt: DeviceRuntime) -> None: ...
        def server_info(self) -> ServerInfoView: ...

    def reload_engines(self, paths: list[str] | None = None) -> ServerInfoView:
        """Load the engine files again (or `paths`: one for all devices or one per device) beside the running ones,
        warm them up, switch every device over between two batches and free the old engines once their last
        batch ends (blocking, seconds). A file that cannot be loaded or warmed up is refused
        (FailedPreconditionError) and every running engine kept: all devices switch, or none. Reloads run one
        after another (a second waits for the first)."""
        self._check_serving()
        with self._reload_lock:
            self._check_serving()
            return self._reload(list(paths) if paths else list(self.config.engines))

    def engine_files_changed(self) -> bool:
        """Whether an engine file the devices run was replaced or rewritten since it was loaded (SIGHUP reloads the
        engines only then: a certificate rotation's SIGHUP need not swap them)."""
        return engine_files_signature(list(self.config.engines)) != self._loaded_files

    def _reload(self, paths: list[str]) -> ServerInfoView:
        cfg = self.config
        if len(paths) not in (1, len(cfg.devices)):
            raise InvalidArgumentError(f"{len(paths)} engine files for {len(cfg.devices)} devices: give one file for "
                                       "all devices or one per device")
        for p in paths:
            check_engine_path(p)
        signature = engine_files_signature(paths)  # before reading them: a file written meanwhile is read again
        log.info("reloading engines: %s", ", ".join(paths))
        loaded: dict[str, LoadedEngine] = {}
        for i, device in enumerate(cfg.devices):
            path = paths[i] if len(paths) > 1 else paths[0]
            rt = self.runtimes[device]
            try:
                if isinstance(rt, RemoteRuntime):  # loaded and warmed up in the device's own process
                    loaded[device] = rt.prepare_swap(path)
                else:
                    loaded[device] = load_engine(self.loader, device, path, cfg.instances, cfg.max_batch,
                                                 self._threads_per_instance())
            except Exception as e:  # a bad file: nothing switches
                for done in loaded.values():
                    done.engine.close()
                why = f"{path} cannot serve on {device} ({type(e).__name__}: {str(e)[:300]})"
                log.error("engine reload refused: %s; the running engines are kept", why)
                raise FailedPreconditionError(f"{why}; the running engines are kept") from None
        switched_at = now()
        old: dict[str, LoadedEngine] = {}
        with self._failover_lock:
            for device, new in loaded.items():
                rt = self.runtimes[device]
                self._names[new.version] = new.info.names
                old[device] = rt.swap(new)
                self.placement.set_cost(device, new.frame_cost_s)
        cfg.engines = paths
        self._loaded_files = signature
        for device, new in loaded.items():
            log.info("%s: now serving %s (model %s, was %s)", device, new.path, new.version, old[device].version)
            rt = self.runtimes[device]
            if rt.health.reset() is Verdict.RECOVERED:
                self._recover(rt)
        for device, previous in old.items():
            self._close_when_idle(device, previous, switched_at)
        return self.server_info()

    def _close_when_idle(self, device: str, previous: LoadedEngine, switched_at: float) -> None:
        """Free an engine swapped out once the runs that started on it before `switched_at` have ended (a hung one
        keeps it: it is left to the process exit, and said so)."""
        end = now() + self.deadline.floor_s + 5.0
        while any(r.started <= switched_at for r in self.supervisor.running(device)) and now() < end:
            self._stop.wait(0.01)
        if any(r.started <= switched_at for r in self.supervisor.running(device)):
            log.warning("%s: the old engine (model %s) still has a run in progress: it is not freed", device,
                        previous.version)
            return
        previous.engine.close()
        release_freed_memory()


def check_engine_path(path: str) -> None:
    """InvalidArgumentError unless `path` names a regular file (a long path or a directory said as such)."""
    shown = path if len(path) <= 300 else f"{path[:300]}... ({len(path)} characters)"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InvalidArgumentError(f"engine file not found: {shown}") from None
    except (OSError, ValueError) as e:  # a name too long, a NUL byte, no permission
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise InvalidArgumentError(f"engine file {shown} cannot be read: {why}") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise InvalidArgumentError(f"engine path {shown} is {what}: give an .onnx, .engine or .pt file")
