"""Devices in processes of their own (a part of `ServerCore`, kept apart for its size; procs/ has the processes):
start them, turn their events into what the single-process server does with its own devices' callbacks, and
start a process again when it dies, its streams and cameras attached again.

Every metric is kept here, in the API process, from those events (results, counts of frames ingested and
dropped, batch outcomes, hangs): one /metrics with the same names and labels as a single process, series of a
removed stream removed, and no counter going back to zero when a device process is replaced.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

import numpy as np

from .frames import FrameResult, now
from .procs import RemoteRuntime, WorkerSpec
from .sources.base import StreamState
from .supervisor import Run

if TYPE_CHECKING:
    from collections.abc import Callable

    from .config import ServerConfig
    from .fanout import Fanout
    from .metrics import Metrics
    from .placement import Placement
    from .runtime import DeviceRuntime
    from .stream import Stream

__all__ = ["ProcessDevices", "split_cores"]

log = logging.getLogger("yolov12_serve.core")

EMPTY = np.zeros((0, 6), np.float32)
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)  # between failed restarts of a device process


def split_cores(devices: list[str], cores: list[int] | None = None) -> dict[str, list[int] | None]:
    """CPU affinity per device process: the cores split between `--gpus cpu:N`'s devices (a contiguous share each,
    shared round-robin when there are fewer cores than devices); GPUs' processes keep every core."""
    if cores is None:
        try:
            cores = sorted(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = list(range(os.cpu_count() or 1))
    cpus = [d for d in devices if d.startswith("cpu")]
    out: dict[str, list[int] | None] = {d: None for d in devices}
    if len(cpus) <= 1:
        return out
    if len(cores) < len(cpus):
        for i, d in enumerate(cpus):
            out[d] = [cores[i % len(cores)]]
        return out
    share, extra = divmod(len(cores), len(cpus))
    start = 0
    for i, d in enumerate(cpus):
        n = share + (i < extra)
        out[d] = cores[start:start + n]
        start += n
    return out


class ProcessDevices:
    """The device-process half of ServerCore (a mixin: it works on the core's registry, metrics and fan-out)."""

    if TYPE_CHECKING:  # what it uses of ServerCore
        config: ServerConfig
        runtimes: dict[str, DeviceRuntime | RemoteRuntime]
        placement: Placement
        metrics: Metrics | None
        fanout: Fanout
        draining: bool
        _streams: dict[str, Stream]
        _private: dict[str, Stream]
        _lock: threading.RLock
        _stop: threading.Event

        def _lookup(self, stream_id: str, epoch: int) -> Stream | None: ...
        def _publish(self, result: FrameResult) -> None: ...
        def _count_drop(self, stream: Stream, reason: str, n: int = 1) -> None: ...
        def _answer_drop(self, stream: Stream, frame_id: int, src_hw: tuple[int, int], capture_time_us: int,
                         ingest_time: float, public: bool, epoch: int, reason: str) -> None: ...
        def _on_hung(self, run: Run) -> None: ...
        def _threads_per_instance(self) -> int | None: ...
        engine_path: Callable[[str], str]

    # ------------------------------------------------------------------------------------------ start
    def _worker_spec(self, device: str, cores: list[int] | None) -> Callable[[str], WorkerSpec]:
        cfg = self.config
        threads = cfg.threads or (max(1, len(cores) // max(1, cfg.instances)) if cores else None)

        def spec(path: str) -> WorkerSpec:
            return WorkerSpec(device, path, cfg, cores, threads, logging.getLogger().getEffectiveLevel(),
                              cfg.engine_loader)

        return spec

    def _start_remote_devices(self, paths: dict[str, str]) -> None:
        """One process per device, started together, each loading and warming up its engine (blocking)."""
        cores = split_cores(list(paths))
        rts = {d: RemoteRuntime(d, self, self._worker_spec(d, cores[d]), self.config.failures_before_unhealthy)
               for d in paths}
        errors: dict[str, BaseException] = {}

        def start(device: str) -> None:
            try:
                rts[device].spawn(paths[device])
            except BaseException as e:
                errors[device] = e

        threads = [threading.Thread(target=start, args=(d,), name=f"start-{d}") for d in paths]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            for rt in rts.values():
                rt.stop(1.0)
            raise next(iter(errors.values()))
        for device, rt in rts.items():
            loaded = rt.loaded
            self.runtimes[device] = rt
            self.placement.add_device(device, loaded.instances, loaded.frame_cost_s)
            self._names[loaded.version] = loaded.info.names
            self._warn_if_too_slow(device, loaded.one_frame_s)
            info = loaded.info
            log.info("%s: %s (model %s, %s, input %s, batch <= %d, %d instances) in process %d%s", device,
                     loaded.path, loaded.version, info.precision, info.imgsz, loaded.max_batch, loaded.instances,
                     rt.pid, f" on cores {','.join(map(str, cores[device]))}" if cores[device] else "")

    # ------------------------------------------------------------------------------------------ events
    def remote_result(self, rt: RemoteRuntime, r: tuple) -> None:
        _, sid, epoch, frame_id, dets, src_hw, capture_us, ingest_time, public, error, version, reason = r
        result = FrameResult(sid, frame_id, EMPTY if dets is None else dets, src_hw, capture_us, now() - ingest_time,
                             rt.name, public, error, epoch, version, reason, ingest_time=ingest_time)
        stream = self._lookup(sid, epoch)
        if stream is None:
            return
        if reason == "invalid":  # a pushed frame that cannot be decoded: its caller ends with INVALID_ARGUMENT
            self.fanout.publish(result)
            return
        stream.src_hw = src_hw  # what ListStreams shows (Stream.put sets it in a single process)
        self._publish(result)

    def remote_dropped_frame(self, rt: RemoteRuntime, r: tuple) -> None:
        _, sid, epoch, frame_id, reason, src_hw, capture_us, ingest_time, public = r
        stream = self._lookup(sid, epoch)
        if stream is not None:
            self._count_drop(stream, reason)
            self._answer_drop(stream, frame_id, src_hw, capture_us, ingest_time, public, epoch, reason)

    def remote_counts(self, rt: RemoteRuntime, kind: str, counts: dict[tuple, int]) -> None:
        t = now()
        for key, n in counts.items():
            stream = self._lookup(key[0], key[1])
            if stream is None:
                continue
            if kind == "in":  # frames ingested: frames_total and the stream's offered rate (placement)
                if not stream.droppable:  # a camera's: added up at a scrape (sync_counts)
                    self._count_ingest(stream, n)
                stream.stats.record_offered(t, n)
            elif kind == "dr":
                self._count_drop(stream, key[2], n)
            elif kind == "sh":  # frames a camera did not hand over under overload: offered, and superseded
                stream.stats.record_shed(t, n)
            elif kind == "cp":  # corrupt video packets its decoder skipped
                self._on_corrupt(stream, n)

    def remote_state(self, rt: RemoteRuntime, stream_id: str, epoch: int, state: int, error: str) -> None:
        stream = self._lookup(stream_id, epoch)
        if stream is not None and stream.runtime is rt:
            stream.set_state(StreamState(state), error)

    def remote_picture(self, rt: RemoteRuntime, stream_id: str, epoch: int, problem: str) -> None:
        stream = self._lookup(stream_id, epoch)
        if stream is not None and stream.runtime is rt:
            stream.note_picture(problem)

    def remote_decoder(self, rt: RemoteRuntime, stream_id: str, epoch: int, decoder: str) -> None:
        stream = self._lookup(stream_id, epoch)
        if stream is not None and stream.runtime is rt:
            stream.note_decoder(decoder)

    def remote_reconnect(self, rt: RemoteRuntime, stream_id: str, epoch: int) -> None:
        stream = self._lookup(stream_id, epoch)
        if stream is not None:
            stream.count_reconnect()

    def remote_hung(self, rt: RemoteRuntime, shape: tuple[int, int], size: int, deadline_s: float) -> None:
        self._on_hung(Run(rt.name, shape, size, deadline_s))  # its frames were answered there

    def remote_lost(self, rt: RemoteRuntime, frames: list[tuple]) -> None:
        """Pushed frames a device process took and can no longer answer (it died): their callers get errors."""
        for sid, epoch, frame_id, src_hw, capture_us, received_at, public in frames:
            stream = self._lookup(sid, epoch)
            if stream is not None:
                self._count_drop(stream, "error")
                self.fanout.publish(FrameResult(sid, frame_id, EMPTY, src_hw, capture_us, now() - received_at,
                                                rt.name, public, f"the process serving {rt.name} stopped; retry",
                                                epoch, drop_reason="error"))

    # ------------------------------------------------------------------------------------------ restarts
    def kill_silent_processes(self, t: float, silent_s: float) -> None:
        """A device process that has sent nothing for `silent_s` (it reports every quarter second) is hung, frozen
        or stopped (SIGSTOP): its run supervisor and camera watchdog are inside it, so nothing else would notice
        and its cameras would stay STREAMING with no results. It is killed, and started again as if it had died."""
        for rt in list(self.runtimes.values()):
            if isinstance(rt, RemoteRuntime) and rt.alive and not rt.loading and not self.draining \
                    and t - rt.last_heard > silent_s:
                log.error("%s: the device process %d has sent nothing for %.0f s (hung or stopped): ending it to "
                          "start it again", rt.name, rt.pid, t - rt.last_heard)
                rt.last_heard = t  # told once; the kill ends its reader, which starts it again (remote_exit)
                rt.kill()

    def remote_exit(self, rt: RemoteRuntime, exitcode: int | None) -> None:
        """A device process ended unasked: say so, and start it again in a thread of its own."""
        if self.draining or self._stop.is_set():
            return
        log.error("%s: the device process %d ended (status %s): starting it again; its streams resume when its "
                  "engine is loaded", rt.name, rt.pid, exitcode)
        if self.metrics is not None:
            self.metrics.worker_restarts.labels(rt.name).inc()
        with self._lock:
            streams = [s for s in [*self._streams.values(), *self._private.values()] if s.runtime is rt]
        for s in streams:
            if s.droppable:
                s.set_state(StreamState.RECONNECTING, f"the process serving {rt.name} stopped: restarting it")
        threading.Thread(target=self._restart, args=(rt,), name=f"restart-{rt.name}", daemon=True).start()

    def _restart(self, rt: RemoteRuntime) -> None:
        attempt = 0
        while not self._stop.is_set() and not self.draining:
            try:
                rt.spawn(rt.engine_path)
                break
            except Exception as e:
                wait = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)]
                log.error("%s: the device process could not be started again (%s); next try in %g s", rt.name, e,
                          wait)
                attempt += 1
                if self._stop.wait(wait):
                    return
        else:
            return
        rt.restarts += 1
        with self._lock:
            streams = [s for s in [*self._streams.values(), *self._private.values()] if s.runtime is rt]
            for s in streams:
                rt.attach(s)  # its camera too, if it was started
        log.info("%s: device process %d serves again (%d streams attached)", rt.name, rt.pid, len(streams))
