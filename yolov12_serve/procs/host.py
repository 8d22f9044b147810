"""The device process: one device's engine, scheduler, worker threads and run supervisor, and the cameras placed
on it (their decoders run here: a decoded frame never leaves this process), driven by the API process.

What the API process says (commands, one pipe message each): bind / unbind a stream, start / stop / restart its
camera, push an encoded frame (decoded here), probe the engine, load / switch / discard an engine (hot swap),
stop. What this process says (events, batched by the Outbox every few ms): each result (a compact tuple), frames
ingested and dropped (counts), a stream's state and reconnects, each batch's outcome, worker errors, hung runs,
queue depth, and replies. The API process keeps the registry, placement, device health, metrics and fan-out, and
acts on these as it acts on its own devices' callbacks in single-process mode.

Started with multiprocessing's `spawn` (the API process runs gRPC threads: a fork would copy their locks), it
imports no gRPC. It ends when its pipe does (the API process gone, however it went). Not PR_SET_PDEATHSIG:
that fires when the parent *thread* that started it ends, and the API process starts them from short-lived
threads.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
import signal
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import ServerConfig
from ..errors import ServerError
from ..frames import Frame, FrameResult, now
from ..health import DeviceHealth
from ..runtime import DeviceRuntime, LoadedEngine, load_engine, release_freed_memory
from ..scheduler import DeadlineScheduler
from ..snapshot import PictureUnreadableError, encode_jpeg
from ..sources import StreamState, make_source
from ..sources.push import decode_frame
from ..stream import Stream
from ..supervisor import Run, RunDeadline, RunSupervisor
from ..worker import BatchOutcome, DeviceWorker
from .ipc import Outbox, loads

__all__ = ["WorkerSpec", "describe", "main"]

log = logging.getLogger("yolov12_serve.procs")

STATS_S = 0.25  # queue depth and in-flight frames reported this often (also the API's sign of life)


@dataclass
class WorkerSpec:
    """What a device process is started with."""

    device: str
    engine_path: str
    config: ServerConfig
    cores: list[int] | None = None  # CPU affinity (--gpus cpu:N splits the cores); None: as inherited
    threads: int | None = None  # intra-op threads per engine instance (ONNX on the CPU)
    log_level: int = logging.INFO
    loader: str | None = None  # 'module:function' opening engine files (tests wrap engines in faults); None: ours


def describe(loaded: LoadedEngine) -> dict[str, Any]:
    """What the API process needs to know of a loaded engine (placement, probes, GetServerInfo)."""
    return {"path": loaded.path, "info": loaded.info, "version": loaded.version, "max_batch": loaded.max_batch,
            "frame_cost_s": loaded.frame_cost_s, "instances": loaded.instances, "camera_shape": loaded.camera_shape,
            "known_shapes": loaded.known_shapes, "one_frame_s": loaded.cost.predict(1, loaded.camera_shape, 0.5)}


class _HostStream(Stream):
    """A stream as the device process holds it: its state changes go to the API process."""

    def __init__(self, host: DeviceHost, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._host = host

    def set_state(self, state: StreamState, error: str = "") -> None:
        before = (self.state, self.last_error)
        super().set_state(state, error)
        # an error is told each time it happens, the same one again too: the API process times it (its age); a
        # state change without one tells none (the API process keeps the one it has, and its time)
        if ((self.state, self.last_error) != before or error) and self.state != StreamState.STOPPED:
            self._host.outbox.put(("st", self.stream_id, self.epoch, int(self.state), self.last_error if error else ""))

    def note_picture(self, problem: str) -> None:
        """Told to the API process, which shows and logs it (picture_check.py)."""
        self.picture_problem = problem
        self._host.outbox.put(("pic", self.stream_id, self.epoch, problem))

    def note_decoder(self, decoder: str) -> None:
        """Told to the API process, which shows it (ListStreams)."""
        super().note_decoder(decoder)
        self._host.outbox.put(("dec", self.stream_id, self.epoch, decoder))


class DeviceHost:
    """One device served in this process for the API process at the other end of `conn`."""

    def __init__(self, conn: Any, spec: WorkerSpec) -> None:
        self.conn = conn
        self.spec = spec
        self.cfg = spec.config
        self.device = spec.device
        self.outbox = Outbox(conn, on_broken=self._parent_gone)
        self.streams: dict[str, _HostStream] = {}
        self.lock = threading.RLock()
        self.supervisor = RunSupervisor(self._on_hung)
        self.deadline = RunDeadline(self.cfg.run_deadline_floor_s, self.cfg.run_deadline_factor)
        self.rt: DeviceRuntime | None = None
        self._pending: dict[int, LoadedEngine] = {}  # engines loaded for a swap, not switched to yet
        # pushed frames are decoded by one of 4 threads, always the same for a stream: its frames stay in order
        self._decoders = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"decode-{i}") for i in range(4)]
        self._stop = threading.Event()

    # ------------------------------------------------------------------------------------------ life
    def _loader(self) -> Any:
        if self.spec.loader:
            module, _, name = self.spec.loader.partition(":")
            return getattr(importlib.import_module(module), name)
        from ..core import _default_loader

        return _default_loader

    def _load(self, path: str) -> LoadedEngine:
        cfg = self.cfg
        return load_engine(self._loader(), self.device, path, cfg.instances, cfg.max_batch, self.spec.threads)

    def start(self) -> None:
        """Load and warm up the engine, start the worker threads; then say hello (blocking, seconds)."""
        loaded = self._load(self.spec.engine_path)
        cfg = self.cfg
        scheduler = DeadlineScheduler(loaded.cost, loaded.max_batch, cfg.process_late, on_drop=self._drop)
        worker = DeviceWorker(self.device, loaded.engine, scheduler, self._publish, threads=loaded.instances,
                              on_outcome=self._on_outcome, on_error=self._on_error, supervisor=self.supervisor,
                              deadline=self.deadline, model_version=loaded.version)
        self.rt = DeviceRuntime(self.device, loaded, scheduler, worker, DeviceHealth(self.device))
        worker.start()
        self.supervisor.start()
        threading.Thread(target=self._watch, name="watchdog", daemon=True).start()
        from .. import priority

        priority.lower_others(cfg.background_nice, cfg.background_batch)
        priority.shorten_lock_turns()
        gc.collect()
        gc.freeze()  # as app.py does: the start-up heap stays out of every later collection
        self.outbox.put(("hello", describe(loaded), os.getpid()))

    def serve(self) -> None:
        """Read and run commands until told to stop or the API process is gone."""
        while not self._stop.is_set():
            try:
                data = self.conn.recv_bytes()
            except (EOFError, OSError):
                self._parent_gone()
                return
            for command in loads(data):
                try:
                    getattr(self, f"_cmd_{command[0]}")(*command[1:])
                except Exception:  # one bad command must not end the device
                    log.exception("%s: command %s failed", self.device, command[0])

    def _parent_gone(self) -> None:
        os._exit(0)  # nobody to serve: the API process is gone (its pipe ended)

    # ------------------------------------------------------------------------------------------ streams
    def _lookup(self, stream_id: str, epoch: int) -> _HostStream | None:
        stream = self.streams.get(stream_id)
        return stream if stream is not None and stream.epoch == epoch else None

    def _cmd_bind(self, stream_id: str, epoch: int, opts: dict[str, Any]) -> None:
        with self.lock:
            old = self.streams.get(stream_id)
            if old is not None:
                self._unbind(old)
            stream = _HostStream(self, stream_id, opts["url"], opts["kind"], opts["max_fps"], opts["slo_s"],
                                 self._on_ingest, self._drop, self._on_reconnect, droppable=opts["droppable"],
                                 public=opts["public"], metrics_label=opts["metrics_label"], epoch=epoch,
                                 group=opts["group"], on_shed=self._on_shed, on_corrupt=self._on_corrupt)
            if not opts["droppable"]:
                stream.state = StreamState.STREAMING
            else:  # a camera: its picture is checked here, where its frames are
                stream.watch_picture(opts.get("blind_after_s", self.cfg.rtsp.blind_after_s))
            stream.number_from(opts.get("first_id", 0))  # on from what the API process published
            stream.bind(self.rt)
            self.streams[stream_id] = stream
        if opts.get("source") is not None:
            self._cmd_source(stream_id, epoch, *opts["source"])

    def _cmd_unbind(self, stream_id: str, epoch: int) -> None:
        with self.lock:
            stream = self._lookup(stream_id, epoch)
            if stream is not None:
                self._unbind(stream)

    def _unbind(self, stream: _HostStream) -> None:
        """Forget a stream here (removed, or moved to another device): its camera stops; frames waiting are
        answered (a pushed frame's caller waits for it) or counted, if the API process still knows the stream."""
        del self.streams[stream.stream_id]
        if stream.source is not None:
            stream.source.stop()
        for frame in self.rt.scheduler.remove_stream(stream.stream_id, stream.epoch):
            self._report_drop(frame, "removed" if frame.droppable else "error")
        stream.close()

    def _cmd_source(self, stream_id: str, epoch: int, kind: str, url: str) -> None:
        with self.lock:
            stream = self._lookup(stream_id, epoch)
            if stream is None or (stream.source is not None and not stream.source.stopped):
                return
            try:
                stream.source = make_source(kind, stream, url, self.cfg.rtsp)
            except Exception as e:
                stream.set_state(StreamState.FAILED, f"cannot open the camera here: {type(e).__name__}: {e}")
                return
        stream.source.start()

    def _cmd_source_stop(self, stream_id: str, epoch: int) -> None:
        stream = self._lookup(stream_id, epoch)
        if stream is not None and stream.source is not None:
            stream.source.stop()

    def _cmd_push(self, stream_id: str, epoch: int, data: bytes, encoding: int, width: int, height: int,
                  frame_id: int, capture_time_us: int, received_at: float) -> None:
        decoder = self._decoders[zlib.crc32(stream_id.encode()) % len(self._decoders)]
        decoder.submit(self._push, stream_id, epoch, data, encoding, width, height, frame_id, capture_time_us,
                       received_at)

    def _push(self, stream_id: str, epoch: int, data: bytes, encoding: int, width: int, height: int, frame_id: int,
              capture_time_us: int, received_at: float) -> None:
        stream = self._lookup(stream_id, epoch)
        if stream is None:
            return
        try:
            image, lb = decode_frame(data, encoding, width, height, stream.plan)
        except ServerError as e:  # the client's bytes: its call ends with INVALID_ARGUMENT
            self.outbox.put(("r", stream_id, epoch, frame_id, None, (height, width), capture_time_us, received_at,
                             stream.public, str(e), "", "invalid"))
            return
        except Exception as e:
            self.outbox.put(("r", stream_id, epoch, frame_id, None, (height, width), capture_time_us, received_at,
                             stream.public, f"cannot decode the frame: {type(e).__name__}: {e}", "", "invalid"))
            return
        stream.put(image, lb, capture_time_us, frame_id=frame_id, ingest_time=received_at)

    # ------------------------------------------------------------------------------------------ engine
    def _reply(self, request: int, ok: bool, payload: Any) -> None:
        self.outbox.put(("reply", request, ok, payload))

    def _cmd_snapshot(self, request: int, stream_id: str, epoch: int, timeout: float) -> None:
        """The camera's next picture as JPEG, answered from a thread of its own (the wait must not hold the commands
        up); not ok when no frame comes within `timeout` or the stream is not here (moved, removed)."""
        stream = self._lookup(stream_id, epoch)
        if stream is None:
            self._reply(request, False, "the stream is not on this device")
            return

        def answer() -> None:
            try:
                taken = stream.pictures.take(timeout)
            except PictureUnreadableError as e:
                self._reply(request, False, f"the picture cannot be taken: {e}")
                return
            if taken is None:
                self._reply(request, False, "")  # no frame came
            else:
                picture, frame_id = taken
                self._reply(request, True, (encode_jpeg(picture), picture.shape[1], picture.shape[0], frame_id))

        threading.Thread(target=answer, name=f"snapshot {stream_id}", daemon=True).start()

    def _cmd_probe(self, request: int, shape: tuple[int, int], size: int) -> None:
        def run() -> None:  # in a thread: a probe may hang, the command loop must not
            from engines.base import run_padded

            try:
                run_padded(self.rt.engine, np.full((size, *shape, 3), 114, np.uint8))
                self._reply(request, True, "")
            except Exception as e:
                self._reply(request, False, f"{type(e).__name__}: {e}")

        threading.Thread(target=run, name="probe", daemon=True).start()

    def _cmd_load(self, request: int, path: str) -> None:
        def run() -> None:
            try:
                loaded = self._load(path)
            except Exception as e:
                self._reply(request, False, f"{type(e).__name__}: {str(e)[:300]}")
                return
            self._pending[request] = loaded
            self._reply(request, True, describe(loaded))

        threading.Thread(target=run, name="load", daemon=True).start()

    def _cmd_switch(self, request: int) -> None:
        new = self._pending.pop(request)
        switched_at = now()
        old = self.rt.swap(new)
        self._reply(request, True, "")

        def close_when_idle() -> None:
            end = now() + self.deadline.floor_s + 5.0
            while any(r.started <= switched_at for r in self.supervisor.running(self.device)) and now() < end:
                self._stop.wait(0.01)
            if not any(r.started <= switched_at for r in self.supervisor.running(self.device)):
                old.engine.close()
                release_freed_memory()

        threading.Thread(target=close_when_idle, name="close-old", daemon=True).start()

    def _cmd_discard(self, request: int) -> None:
        loaded = self._pending.pop(request, None)
        if loaded is not None:
            loaded.engine.close()

    def _cmd_stop(self, timeout: float) -> None:
        """Stop the cameras, let frames in flight finish (up to `timeout`), stop the workers, say goodbye."""
        with self.lock:
            streams = list(self.streams.values())
        for s in streams:
            if s.source is not None:
                s.source.stop()
        end = now() + timeout
        while now() < end and self.rt.scheduler.stats().in_flight:
            self._stop.wait(0.02)
        self.supervisor.stop()
        self.rt.worker.stop(max(0.1, end - now()))
        self.outbox.put(("bye",))
        self.outbox.close()
        self._stop.set()

    # ------------------------------------------------------------------------------------------ callbacks
    def _on_ingest(self, stream: Stream) -> None:
        self.outbox.count("in", (stream.stream_id, stream.epoch))

    def _on_shed(self, stream: Stream, n: int) -> None:
        self.outbox.count("sh", (stream.stream_id, stream.epoch), n)

    def _drop(self, frame: Frame, reason: str) -> None:
        if self._lookup(frame.stream_id, frame.epoch) is not None:
            self._report_drop(frame, reason)

    def _report_drop(self, frame: Frame, reason: str) -> None:
        if frame.droppable:
            self.outbox.count("dr", (frame.stream_id, frame.epoch, reason))
        else:  # a push or image caller waits for this frame: the API process answers it
            self.outbox.put(("d", frame.stream_id, frame.epoch, frame.frame_id, reason, frame.letterbox.src_hw,
                             frame.capture_time_us, frame.ingest_time, frame.public))

    def _on_reconnect(self, stream: Stream) -> None:
        self.outbox.put(("rc", stream.stream_id, stream.epoch))

    def _on_corrupt(self, stream: Stream) -> None:
        self.outbox.count("cp", (stream.stream_id, stream.epoch))

    def _publish(self, result: FrameResult) -> None:
        if self._lookup(result.stream_id, result.epoch) is None:
            return  # removed or moved while it ran
        dets = result.detections if len(result.detections) else None
        self.outbox.put(("r", result.stream_id, result.epoch, result.frame_id, dets, result.src_hw,
                         result.capture_time_us, now() - result.latency_s, result.public, result.error,
                         result.model_version, result.drop_reason))

    def _on_outcome(self, o: BatchOutcome) -> None:
        self.outbox.put(("out", o.shape, o.size, o.seconds, o.started, o.error))

    def _on_error(self, device: str) -> None:
        self.outbox.put(("werr",))

    def _on_hung(self, run: Run) -> None:
        """A run past its deadline (the supervisor's thread): answer its frames here, replace its thread, and let
        the API process decide about the device."""
        if run.owner is not None:
            self.rt.worker.abandon(run)
        self.outbox.put(("hung", run.shape, run.size, run.deadline_s, run.describe()))
        self.rt.worker.replenish()

    # ------------------------------------------------------------------------------------------ watchdog
    def _watch(self) -> None:
        """Cameras that stopped delivering frames while STREAMING are reconnected (as the single-process server's
        watchdog does); queue depth and frames in flight go to the API process every STATS_S."""
        stall = self.cfg.rtsp.stall_s
        while not self._stop.wait(STATS_S):
            try:
                t = now()
                with self.lock:
                    streams = list(self.streams.values())
                for s in streams:
                    s.restart_if_stalled(t, stall)
                st = self.rt.scheduler.stats()
                self.outbox.put(("stats", st.queued, st.in_flight, st.streams, self.rt.worker.live_threads))
            except Exception:
                log.exception("%s: watchdog round failed", self.device)

    def _cmd_source_restart(self, stream_id: str, epoch: int, reason: str) -> None:
        stream = self._lookup(stream_id, epoch)
        if stream is not None and stream.source is not None:
            stream.source.restart(reason)


def main(conn: Any, spec: WorkerSpec) -> None:
    """The device process's entry point (multiprocessing spawn target)."""
    # ^C reaches the whole process group, and systemd's stop SIGTERMs the whole cgroup: the API process drains its
    # device processes itself (a device process ending first would be started again); a reload comes as a command
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=spec.log_level, format=f"%(asctime)s %(levelname)s %(name)s [{spec.device}]: "
                        "%(message)s")
    from ..security import install_log_redaction

    install_log_redaction()
    if spec.cores:
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setaffinity(0, spec.cores)
    host = DeviceHost(conn, spec)
    try:
        host.start()
    except BaseException as e:  # the engine cannot serve here: say why, then end
        host.outbox.put(("fatal", f"{type(e).__name__}: {e}"))
        host.outbox.flush()
        host.outbox.close()
        return
    host.serve()
    from ..sources.rtsp import end_camera_threads

    end_camera_threads()  # none may be inside FFmpeg when this interpreter goes (segmentation fault)
    log.debug("%s: device process ends", spec.device)
