"""The API process's side of a device process: `RemoteRuntime` stands where a `DeviceRuntime` stands in the server
core (the same few calls: attach, probe, swap, the scheduler's stats and remove_stream, the worker's stop), and
`RemoteSource` stands where a camera's source stands (the decoder runs in the device process).

Each RemoteRuntime owns one `spawn`ed process (host.py) and a thread reading its events; the core's callbacks
(`ProcessEvents`, implemented by core.py's ProcessDevices part) turn them into what the single-process server
does with its own devices' callbacks: results published to the fan-out, frames and drops counted, stream states
and device health updated. A process that exits unasked is started again by the core and its streams attached
again (their cameras too); pushed frames it held are answered as errors.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from engines.base import EngineError, EngineInfo

from ..frames import now
from ..health import DeviceHealth
from ..preprocess import InputPlanner
from ..scheduler import SchedulerStats
from ..sources.base import Source
from ..supervisor import RunDeadline, RunSupervisor
from ..worker import BatchOutcome
from .host import WorkerSpec, main
from .ipc import dumps, loads

if TYPE_CHECKING:
    from ..stream import Stream

__all__ = ["ProcessEvents", "RemoteLoaded", "RemoteRuntime", "RemoteSource"]

log = logging.getLogger("yolov12_serve.core")

EMPTY = np.zeros((0, 6), np.float32)
START_TIMEOUT_S = 600.0  # loading and warming up an engine (a TensorRT engine, CUDA graphs): minutes at most


class ProcessEvents(Protocol):
    """What the core does with a device process's events (core.py: ProcessDevices)."""

    def remote_result(self, rt: RemoteRuntime, record: tuple) -> None: ...
    def remote_dropped_frame(self, rt: RemoteRuntime, record: tuple) -> None: ...
    def remote_counts(self, rt: RemoteRuntime, kind: str, counts: dict[tuple, int]) -> None: ...
    def remote_state(self, rt: RemoteRuntime, stream_id: str, epoch: int, state: int, error: str) -> None: ...
    def remote_reconnect(self, rt: RemoteRuntime, stream_id: str, epoch: int) -> None: ...
    def remote_picture(self, rt: RemoteRuntime, stream_id: str, epoch: int, problem: str) -> None: ...
    def remote_decoder(self, rt: RemoteRuntime, stream_id: str, epoch: int, decoder: str) -> None: ...
    def remote_hung(self, rt: RemoteRuntime, shape: tuple[int, int], size: int, deadline_s: float) -> None: ...
    def remote_lost(self, rt: RemoteRuntime, frames: list[tuple]) -> None: ...
    def remote_exit(self, rt: RemoteRuntime, exitcode: int | None) -> None: ...
    def _on_outcome(self, outcome: BatchOutcome) -> None: ...
    def _on_worker_error(self, device: str) -> None: ...


class _Cost:
    """A loaded engine's run-time estimate as the API process knows it (the model itself lives in the device)."""

    def __init__(self, one_frame_s: float) -> None:
        self.one_frame_s = one_frame_s

    def predict(self, n: int, shape: tuple[int, int], q: float = 0.5, others: int = 0) -> float:
        return self.one_frame_s * max(1, n)


class _EngineView:
    """`rt.engine` of a remote device: its metadata; `close()` discards an engine loaded for a swap and never
    switched to (an engine switched away from is closed by the device process when its last run ends)."""

    def __init__(self, loaded: RemoteLoaded) -> None:
        self._loaded = loaded
        self.info = loaded.info
        self.instances = loaded.instances

    def close(self) -> None:
        self._loaded.discard()


@dataclass(eq=False)
class RemoteLoaded:
    """An engine loaded in a device process (LoadedEngine's fields the core reads)."""

    rt: RemoteRuntime
    path: str
    info: EngineInfo
    version: str
    max_batch: int
    frame_cost_s: float
    instances: int
    camera_shape: tuple[int, int]
    known_shapes: list[tuple[int, int]]
    one_frame_s: float
    request: int = 0  # the load request of an engine not switched to yet (hot swap); 0: none
    planner: InputPlanner = field(init=False)

    def __post_init__(self) -> None:
        self.planner = InputPlanner.for_engine(self.info)

    @classmethod
    def from_description(cls, rt: RemoteRuntime, d: dict[str, Any], request: int = 0) -> RemoteLoaded:
        return cls(rt, d["path"], d["info"], d["version"], d["max_batch"], d["frame_cost_s"], d["instances"],
                   tuple(d["camera_shape"]), [tuple(s) for s in d["known_shapes"]], d["one_frame_s"], request)

    @property
    def engine(self) -> _EngineView:
        return _EngineView(self)

    @property
    def cost(self) -> _Cost:
        return _Cost(self.one_frame_s)

    def discard(self) -> None:
        if self.request:
            self.rt.send("discard", self.request)
            self.request = 0


class _Reply:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.ok = False
        self.payload: Any = None


class _SchedulerView:
    """`rt.scheduler` of a remote device: the stats it last reported; a stream leaves it with `remove_stream`."""

    def __init__(self, rt: RemoteRuntime) -> None:
        self._rt = rt
        self.cost: Any = None  # set by a swap; the device process has its own
        self.max_batch = 0

    def remove_stream(self, stream_id: str, epoch: int | None = None) -> list:
        self._rt.send("unbind", stream_id, epoch)
        return []  # frames waiting there are answered (pushed) or counted by the device process

    def stats(self) -> SchedulerStats:
        return self._rt.stats

    def shutdown(self) -> None:
        pass


class _WorkerView:
    """`rt.worker` of a remote device: its threads live in the device process."""

    def __init__(self, rt: RemoteRuntime) -> None:
        self._rt = rt

    @property
    def threads(self) -> int:
        return self._rt.loaded.instances if self._rt.loaded else 0

    @property
    def live_threads(self) -> int:
        return self._rt.live_threads

    def stop(self, timeout: float = 5.0) -> None:
        self._rt.stop(timeout)

    def abandon(self, run: Any) -> None:
        pass

    def replenish(self) -> None:
        pass


class RemoteSource(Source):
    """A camera whose decoder runs in the device process its stream is placed on (started, stopped and restarted
    there; stalls are caught by that process's watchdog)."""

    kind = "remote"
    watchdog = False

    def __init__(self, sink: Stream, url: str, url_kind: str) -> None:
        super().__init__(sink)
        self.url = url  # credentials included: it goes only to the device process, over its pipe
        self.url_kind = url_kind
        self.started = False

    def start(self) -> None:
        self.started = True
        rt = self.sink.runtime
        if isinstance(rt, RemoteRuntime):
            rt.send("source", self.sink.stream_id, self.sink.epoch, self.url_kind, self.url)

    def stop(self) -> None:
        super().stop()
        rt = self.sink.runtime
        if isinstance(rt, RemoteRuntime) and self.started:
            rt.send("source_stop", self.sink.stream_id, self.sink.epoch)

    def restart(self, reason: str) -> None:
        rt = self.sink.runtime
        if isinstance(rt, RemoteRuntime):
            rt.send("source_restart", self.sink.stream_id, self.sink.epoch, reason)


class RemoteRuntime:
    """One device served by a process of its own (see the module docstring)."""

    def __init__(self, device: str, events: ProcessEvents, spec_for: Callable[[str], WorkerSpec],
                 failures_before_unhealthy: int = 3) -> None:
        self.name = device
        self.health = DeviceHealth(device, failures_before_unhealthy)
        self.probing = False
        self.last_probe = now()
        self.lock = threading.Lock()
        self.loaded: RemoteLoaded | None = None
        self.scheduler = _SchedulerView(self)
        self.worker = _WorkerView(self)
        self.pid = 0
        self.restarts = 0
        self.alive = False
        self.last_heard = 0.0  # now() of the device process's last message (it reports every STATS_S)
        self.loading = False  # a hot swap's engine is loading in the process (prepare_swap)
        self.stats = SchedulerStats(0, 0, 0)
        self.live_threads = 0
        self._events = events
        self._spec_for = spec_for
        self._conn: Any = None
        self._proc: Any = None
        self._send_lock = threading.Lock()
        self._requests = itertools.count(1)
        self._replies: dict[int, _Reply] = {}
        self._pushes: dict[tuple[str, int], dict[int, tuple]] = {}  # pushed frames not answered yet
        self._pushes_lock = threading.Lock()
        self._stopping = False

    # ------------------------------------------------------------------------------------------ DeviceRuntime's
    @property
    def engine(self) -> _EngineView:
        return self.loaded.engine

    @property
    def engine_path(self) -> str:
        return self.loaded.path

    @property
    def planner(self) -> InputPlanner:
        return self.loaded.planner

    @property
    def cost(self) -> _Cost:
        return self.loaded.cost

    @property
    def max_batch(self) -> int:
        return self.loaded.max_batch

    @property
    def version(self) -> str:
        return self.loaded.version

    def attach(self, stream: Stream) -> None:
        """Serve `stream` in the device process (and start its camera there, if it was started)."""
        src = stream.source
        source = (src.url_kind, src.url) if isinstance(src, RemoteSource) and src.started and not src.stopped \
            else None
        opts = {"url": stream.url, "kind": stream.kind, "max_fps": stream.max_fps, "slo_s": stream.slo_s,
                "droppable": stream.droppable, "public": stream.public, "metrics_label": stream.metrics_label,
                "group": stream.group, "source": source, "blind_after_s": stream.blind_after_s,
                "first_id": stream.next_frame_id()}
        self.send("bind", stream.stream_id, stream.epoch, opts)

    def push(self, stream: Stream, data: bytes, encoding: int, width: int, height: int, frame_id: int,
             capture_time_us: int, received_at: float) -> None:
        """A pushed frame, as its encoded bytes, to be decoded and run in the device process."""
        key = (stream.stream_id, stream.epoch)
        with self._pushes_lock:
            self._pushes.setdefault(key, {})[frame_id] = (stream.stream_id, stream.epoch, frame_id, (height, width),
                                                          capture_time_us, received_at, stream.public)
        if not self.alive or not self.send("push", stream.stream_id, stream.epoch, data, encoding, width, height,
                                           frame_id, capture_time_us, received_at):
            self._lose_pushes(key)

    def probe(self, shape: tuple[int, int], size: int, supervisor: RunSupervisor,
              deadline: RunDeadline) -> tuple[bool | None, str]:
        """Run a grey batch in the device process under the API's supervisor (it may never answer)."""
        run = supervisor.begin(self.name, shape, size, deadline(self.loaded.one_frame_s * size * 3))
        try:
            ok, error = self.request("probe", tuple(shape), size)
        except EngineError as e:
            ok, error = False, str(e)
        if not supervisor.end(run):
            return None, ""
        return ok, "" if ok else str(error)

    def prepare_swap(self, path: str) -> RemoteLoaded:
        """Load and warm up `path` in the device process beside the running engine (blocking); EngineError if it
        cannot serve."""
        request = next(self._requests)
        self.loading = True  # an engine may hold the process's interpreter while it loads: not a sign of a hang
        try:
            ok, payload = self.request("load", path, request=request, timeout=START_TIMEOUT_S)
        finally:
            self.loading = False
            self.last_heard = now()
        if not ok:
            raise EngineError(payload)
        return RemoteLoaded.from_description(self, payload, request)

    def swap(self, new: RemoteLoaded) -> RemoteLoaded:
        """Switch to `new` (loaded by prepare_swap) from the next batch on; returns the old one."""
        request, new.request = new.request, 0
        self.request("switch", request=request)
        old, self.loaded = self.loaded, new
        return old

    # ------------------------------------------------------------------------------------------ the process
    def spawn(self, path: str) -> None:
        """Start the device process on `path` and wait until its engine is warm (blocking); EngineError with the
        process's reason when it cannot serve."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=main, args=(child, self._spec_for(path)), name=f"yolov12-{self.name}",
                           daemon=True)
        proc.start()
        child.close()
        end = now() + START_TIMEOUT_S
        hello: tuple | None = None
        early: list[tuple] = []
        while hello is None:
            if now() > end:
                proc.kill()
                raise EngineError(f"the process for {self.name} did not load {path} in {START_TIMEOUT_S:.0f} s")
            try:
                ready = parent.poll(0.1)
                events = loads(parent.recv_bytes()) if ready else []
            except (EOFError, OSError):
                events, ready = [], False
                proc.join(5)
            if not ready and not proc.is_alive():
                raise EngineError(f"the process for {self.name} exited (status {proc.exitcode}) before its engine "
                                  "was loaded: see its log lines above")
            for ev in events:
                if ev[0] == "fatal":
                    proc.join(5)
                    raise EngineError(f"{self.name}: {ev[1]}")
                if ev[0] == "hello":
                    hello = ev
                elif hello is not None:
                    early.append(ev)
        self.loaded = RemoteLoaded.from_description(self, hello[1])
        self.pid = hello[2]
        self._conn, self._proc = parent, proc
        self._stopping = False
        self.last_heard = now()
        self.alive = True
        for ev in early:
            self._dispatch(ev)
        threading.Thread(target=self._receive, args=(parent, proc), name=f"events-{self.name}", daemon=True).start()

    def send(self, op: str, *args: Any) -> bool:
        """One command to the device process; False when it is gone (its exit is handled by the reader)."""
        conn = self._conn
        if conn is None:
            return False
        data = dumps([(op, *args)])
        try:
            with self._send_lock:
                conn.send_bytes(data)
            return True
        except (OSError, ValueError):
            return False

    def request(self, op: str, *args: Any, request: int | None = None, timeout: float | None = None) -> Any:
        """Send a command that is answered and wait for (ok, payload); EngineError if the process goes first."""
        request = next(self._requests) if request is None else request
        reply = self._replies[request] = _Reply()
        try:
            if not self.send(op, request, *args):
                raise EngineError(f"the process for {self.name} is not running")
            if not reply.event.wait(timeout):
                raise EngineError(f"the process for {self.name} did not answer {op} in {timeout:.0f} s")
            if reply.payload is _GONE:
                raise EngineError(f"the process for {self.name} ended before it answered {op}")
            return reply.ok, reply.payload
        finally:
            self._replies.pop(request, None)

    def stop(self, timeout: float = 5.0) -> None:
        """Drain the device process (frames in flight finish, up to `timeout`) and end it."""
        self._stopping = True
        proc = self._proc
        if proc is None:
            return
        self.send("stop", max(0.1, timeout - 0.5))
        proc.join(timeout + 1.0)
        if proc.is_alive():
            proc.kill()
            proc.join(2)
        self.alive = False

    def kill(self) -> None:
        """End the device process at once (tests; a drain that cannot wait)."""
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()

    def _receive(self, conn: Any, proc: Any) -> None:
        while True:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                break
            self.last_heard = now()
            try:
                events = loads(data)
            except Exception:
                log.exception("%s: unreadable message from the device process", self.name)
                continue
            for ev in events:
                try:
                    self._dispatch(ev)
                except Exception:
                    log.exception("%s: handling %s from the device process failed", self.name, ev[0])
        proc.join(5)
        if proc is not self._proc:
            return  # an earlier incarnation's reader
        self.alive = False
        with self._send_lock:
            self._conn = None
        for reply in list(self._replies.values()):
            reply.payload = _GONE
            reply.event.set()
        with self._pushes_lock:
            keys = list(self._pushes)
        for key in keys:
            self._lose_pushes(key)
        if not self._stopping:
            self._events.remote_exit(self, proc.exitcode)

    def _lose_pushes(self, key: tuple[str, int]) -> None:
        with self._pushes_lock:
            frames = list(self._pushes.pop(key, {}).values())
        if frames:
            self._events.remote_lost(self, frames)

    def _answered(self, stream_id: str, epoch: int, frame_id: int) -> None:
        with self._pushes_lock:
            pending = self._pushes.get((stream_id, epoch))
            if pending is not None:
                pending.pop(frame_id, None)
                if not pending:
                    del self._pushes[(stream_id, epoch)]

    def snapshot(self, stream_id: str, epoch: int, timeout: float) -> tuple[bytes, int, int, int] | None:
        """The camera's next picture, taken and encoded in the device process (GetSnapshot): (JPEG, width, height,
        frame id), or None when no frame came within `timeout`; EngineError if the process does not answer, or says
        why the picture cannot be taken."""
        ok, payload = self.request("snapshot", stream_id, epoch, timeout, timeout=timeout + 5)
        if not ok and payload:
            raise EngineError(str(payload))
        return tuple(payload) if ok else None

    def forget_pushes(self, stream_id: str, epoch: int) -> None:
        """A push or image stream ended: nothing of it is owed any more."""
        with self._pushes_lock:
            self._pushes.pop((stream_id, epoch), None)

    def _dispatch(self, ev: tuple) -> None:
        kind = ev[0]
        events = self._events
        if kind == "r":
            if self._pushes:
                self._answered(ev[1], ev[2], ev[3])
            events.remote_result(self, ev)
        elif kind == "counts":
            events.remote_counts(self, ev[1], ev[2])
        elif kind == "d":
            self._answered(ev[1], ev[2], ev[3])
            events.remote_dropped_frame(self, ev)
        elif kind == "st":
            events.remote_state(self, ev[1], ev[2], ev[3], ev[4])
        elif kind == "rc":
            events.remote_reconnect(self, ev[1], ev[2])
        elif kind == "pic":
            events.remote_picture(self, ev[1], ev[2], ev[3])
        elif kind == "dec":
            events.remote_decoder(self, ev[1], ev[2], ev[3])
        elif kind == "out":
            events._on_outcome(BatchOutcome(self.name, tuple(ev[1]), ev[2], ev[3], ev[4], ev[5]))
        elif kind == "werr":
            events._on_worker_error(self.name)
        elif kind == "hung":
            events.remote_hung(self, tuple(ev[1]), ev[2], ev[3])
        elif kind == "stats":
            self.stats = SchedulerStats(ev[1], ev[2], ev[3])
            self.live_threads = ev[4]
        elif kind == "reply":
            reply = self._replies.get(ev[1])
            if reply is not None:
                reply.ok, reply.payload = ev[2], ev[3]
                reply.event.set()
        elif kind == "bye":
            self._stopping = True


_GONE = object()
