"""How the server keeps its devices honest (a part of `ServerCore`, kept apart for its size): what each batch and
each hung run tell a device's health (health.py decides), and what the server then does: probe the engine in a
thread of its own, move a failed device's streams to the healthy ones (serialised: two devices failing at once
must not pick each other), put a device back in service, say so on health and metrics, and hand a camera from
a device that stays over capacity to a lighter one.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from .faultlog import FaultLog
from .frames import now
from .health import Verdict
from .runtime import DeviceRuntime
from .stream import Stream
from .supervisor import Run
from .worker import BatchOutcome

if TYPE_CHECKING:
    from collections.abc import Callable

    from .config import ServerConfig
    from .frames import Frame
    from .metrics import Metrics
    from .placement import Placement
    from .supervisor import RunDeadline, RunSupervisor

__all__ = ["DeviceCare"]

log = logging.getLogger("yolov12_serve.core")


class DeviceCare:
    """The device-health half of ServerCore (a mixin: it works on the core's registry, placement and locks)."""

    if TYPE_CHECKING:  # what it uses of ServerCore
        config: ServerConfig
        runtimes: dict[str, DeviceRuntime]
        placement: Placement
        metrics: Metrics | None
        supervisor: RunSupervisor
        deadline: RunDeadline
        ready: bool
        starting: bool
        draining: bool
        on_health_change: Callable[[bool], None]
        on_device_health: Callable[[str, bool], None]
        _streams: dict[str, Stream]
        _private: dict[str, Stream]
        _lock: threading.RLock
        _failover_lock: threading.Lock
        _over_since: dict[str, float]
        _recheck_faults: dict[str, FaultLog]
        _stop: threading.Event

        def _drop(self, frame: Frame, reason: str) -> None: ...

    def _on_outcome(self, outcome: BatchOutcome) -> None:
        """A batch ran (or raised): metrics, then the device's health decides whether anything must change."""
        rt = self.runtimes.get(outcome.device)
        if rt is None:
            return
        if outcome.error is None:
            if self.metrics is not None:
                inference, batch_size = self.metrics.runs(outcome.device)
                inference.observe(outcome.seconds)
                batch_size.observe(outcome.size)
            verdict = rt.health.succeeded(outcome.shape, outcome.started)
        else:
            if self.metrics is not None:
                self.metrics.engine_failures.labels(outcome.device).inc()
            verdict = rt.health.failed(outcome.error, outcome.shape, outcome.size)
        self._act(rt, verdict)

    def _on_worker_error(self, device: str) -> None:
        if self.metrics is not None:
            self.metrics.worker_errors.labels(device).inc()

    def _on_hung(self, run: Run) -> None:
        """The supervisor found a run past its deadline (its thread): answer its frames, replace its thread, and
        take the device out of service."""
        rt = self.runtimes.get(run.device)
        if rt is None:
            return
        if self.metrics is not None:
            self.metrics.engine_hangs.labels(run.device).inc()
        error = f"engine run hung: {run.describe()} got no answer within {run.deadline_s:.1f} s"
        log.error("%s: %s%s", run.device, error, "" if run.owner is not None else " (a re-check)")
        # Its frames are answered before the streams move (a later frame's result, run on another device, would
        # make theirs superseded), and the stuck thread replaced after (the new one must find no frame of theirs
        # left to hang on).
        if run.owner is not None:
            rt.worker.abandon(run)
        self._act(rt, rt.health.hung(error, run.shape, run.size))
        rt.worker.replenish()

    def _act(self, rt: DeviceRuntime, verdict: Verdict) -> None:
        if verdict is Verdict.PROBE:
            fault = rt.health.fault
            log.warning("%s: %d batches in a row failed, all at %s (%s): probing a shape it ran before to tell the "
                        "device from the input", rt.name, rt.health.streak, fault.shape if fault else "?",
                        fault.error if fault else "")
            self._start_probe(rt)
        elif verdict is Verdict.UNHEALTHY:
            self._fail_over(rt)
        elif verdict is Verdict.RECOVERED:
            self._recover(rt)

    def _start_probe(self, rt: DeviceRuntime) -> None:
        """Probe the device's engine in a thread of its own (at most one per device: a probe may hang)."""
        with rt.lock:
            if rt.probing or self._stop.is_set():
                return
            rt.probing = True
            rt.last_probe = now()
        threading.Thread(target=self._probe, args=(rt,), name=f"probe-{rt.name}", daemon=True).start()

    def _probe(self, rt: DeviceRuntime) -> None:
        try:
            plan = rt.health.probe_plan(rt.loaded.known_shapes)
            if plan is None:
                return
            shape, size = plan
            ok, error = rt.probe(shape, size, self.supervisor, self.deadline)
            if ok is None:
                return  # it hung: the supervisor reported that
            if not ok:  # every --recheck-s while it lasts: on change only
                faults = self._recheck_faults.setdefault(rt.name, FaultLog(log, "%s: engine re-check", (rt.name,)))
                faults.failed(f"still failing on a batch of {size} at {shape[0]}x{shape[1]} ({error})")
            refused = rt.health.refused_shapes
            self._act(rt, rt.health.probed(ok, error))
            new = rt.health.refused_shapes - refused
            for shape in new:
                log.error("%s: the engine fails on %dx%d inputs but runs others: frames of that shape fail alone "
                          "(their streams show the error); the device keeps serving", rt.name, *shape)
        except Exception:
            log.exception("%s: probing the engine failed", rt.name)
        finally:
            with rt.lock:
                rt.probing = False
                rt.last_probe = now()

    def _fail_over(self, rt: DeviceRuntime) -> None:
        """Take a device out of service: its streams move to the healthy devices (serialised: two devices failing
        at once must not pick each other), health and metrics say so; with no healthy device left the streams
        stay (NOT_SERVING) and the re-checks go on."""
        fault = rt.health.fault
        why = fault.error if fault is not None else "failing"
        with self._failover_lock:
            for name, other in self.runtimes.items():  # every device's own verdict, not a stale flag
                self.placement.set_healthy(name, other.health.healthy)
            self.on_device_health(rt.name, False)
            self._update_serving()
            if not self.placement.healthy_devices():
                log.error("%s is out of service (%s) and no other device is healthy: NOT_SERVING; its streams stay "
                          "and the engine is re-checked every %g s", rt.name, why, self.config.recheck_s)
                return
            with self._lock:
                moving = [s for s in [*self._streams.values(), *self._private.values()] if s.runtime is rt]
                targets = {}
                for stream in moving:
                    target = self.placement.assign(stream.stream_id, self._expected_fps(stream))
                    self._move(stream, self.runtimes[target])
                    targets[target] = targets.get(target, 0) + 1
                    if self.metrics is not None and stream.public:
                        self.metrics.stream_moves.labels("failover").inc()
        where = ", ".join(f"{n} to {d}" for d, n in sorted(targets.items())) or "none to move"
        log.error("%s is out of service (%s): streams moved: %s; re-checked every %g s", rt.name, why, where,
                  self.config.recheck_s)

    def _move(self, stream: Stream, target: DeviceRuntime) -> None:
        """Run a stream on `target` from its next frame; its waiting frames go along where they fit the target's
        input (the same engine geometry), else they are dropped as errors (the lock held)."""
        old = stream.runtime
        pending = old.scheduler.remove_stream(stream.stream_id, stream.epoch) if old is not None else []
        stream.bind(target)
        for frame in pending:
            if target.planner.plan(frame.letterbox.src_hw) == frame.letterbox:
                replaced = target.scheduler.submit(frame)
                if replaced is not None:
                    self._drop(replaced, "superseded" if replaced is not frame else "error")
            else:
                self._drop(frame, "error")

    def _recover(self, rt: DeviceRuntime) -> None:
        with self._failover_lock:
            self.placement.set_healthy(rt.name, True)
        faults = self._recheck_faults.pop(rt.name, None)
        log.info("%s: engine works again: the device takes streams%s", rt.name,
                 f" ({faults.failures} re-checks failed before)" if faults is not None and faults.failures else "")
        self.on_device_health(rt.name, True)
        self._update_serving()

    def _update_serving(self) -> None:
        """Health says SERVING once the engines are loaded and the starting streams added, while the server is not
        draining and a device is healthy."""
        serving = (self.ready and not self.starting and not self.draining
                   and any(rt.health.healthy for rt in self.runtimes.values()))
        self.on_health_change(serving)

    def _expected_fps(self, stream: Stream) -> float:
        """What placement should expect of a stream moving: what it offered lately, else its cap."""
        return stream.stats.offered_fps() or stream.max_fps

    def _rebalance(self, t: float) -> None:
        """A healthy device whose cameras have offered more than it can run for `rebalance_s` hands one camera to
        a device where it lowers the busier load (one move per period, so rates settle before the next)."""
        if self.config.rebalance_s <= 0 or len(self.runtimes) < 2:
            return
        loads = self.placement.loads()
        for device, load in loads.items():
            if load <= 1.0 or not self.runtimes[device].health.healthy:
                self._over_since.pop(device, None)
                continue
            since = self._over_since.setdefault(device, t)
            if t - since < self.config.rebalance_s:
                continue
            self._over_since[device] = t  # the next move, if any, after another period
            with self._failover_lock, self._lock:
                movable = {s.stream_id for s in self._streams.values() if s.droppable and s.runtime is not None
                           and s.runtime.name == device}
                plan = self.placement.plan_move(device, movable)
                if plan is None:
                    continue
                sid, target = plan
                stream = self._streams[sid]
                self.placement.move(sid, target)
                self._move(stream, self.runtimes[target])
            if self.metrics is not None:
                self.metrics.stream_moves.labels("rebalance").inc()
            after = self.placement.loads()
            log.warning("%s has been over capacity (load %.2f) for %g s: stream %s moved to %s (loads now %.2f and "
                        "%.2f)", device, load, self.config.rebalance_s, sid, target, after[device], after[target])
