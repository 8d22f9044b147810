"""Per-device batching policy behind a small interface (the vLLM shape): streams in, `Batch`es out, outputs back.

`DeadlineScheduler` is work-conserving and deadline-aware. When an engine instance asks for work it
looks at the newest frame of every stream that has none in flight, drops the frames that cannot meet
their deadline even alone with a typical (median) run (reason "late", unless `process_late`), takes
the frame with the earliest deadline and, among the ready frames of the same input shape (oldest
deadline first), the largest batch whose slow-run (90th percentile) time still ends before that
earliest deadline, but no more than its share when other instances are idle too (so K instances run
K batches at once instead of one instance taking everything while the others wait). Under sustained
overload (cameras offering more frames per second than the instances can run) frames are lost whatever
goes first; the newest frame of the camera served longest ago goes first instead: no camera starves
and results come fresher than just inside the SLO (see `_overloaded`); a pick then walks the groups in the
order of their turns until it holds a batch, instead of sorting every camera (`_walk_turns`), and a frame too near
its deadline to wait for a full batch is passed over rather than shrinking the batch (`_fullest`). Cameras then
shed the frames that could not run before they cost the host path (`admits`, `_admission`; synthetic cameras do
not even tick for them: `shed_for`). Shares still
follow the cameras' phases: a frame that finds an instance idle and no other frame on time runs at once
(work-conserving), so a camera whose frames come right after a gap in the others' phases gets more (12 RTSP cameras at
25 fps on 2 cores: 2-14 results/s per camera, 64% of runs started by a lone on-time frame).

So that a wrong, too-slow estimate cannot make it drop everything forever (and never measure again),
a lone frame is run to re-measure it when the model has not measured one (of that shape, beside as
many running batches) for `probe_s`, at most once per `probe_s` and shape: a predicted-late frame that
still has time left, or, while frames run late in batches, a batch of one (otherwise a batch-1
estimate taken while the CPU was crowded kept every frame "infeasible", late and batched for good).
Estimates in use are fresh by definition, so under steady load nothing is probed: each probe is a
frame run against the prediction, and at 40 frames/s one a second was 2.5% of frames over the SLO. When
even a lone frame takes longer than the SLO (an engine too slow for it), dropping cannot help anyone:
frames are then run, freshest first, and show up as SLO misses instead. "A lone frame" is the faster
of a frame alone and one beside the batches running now: under saturation a device is never idle,
so its alone-figure can be stale (cameras starting up) for good while the beside-figure is fresh.
A batch whose first frame is late anyway (that case, --process-late) gets the smallest
size with 95% of the best frames/s the model knows: big on GPUs, where batching pays, 1 on CPUs,
where it only adds latency.

Pushed frames (Detect, DetectImage) have deadlines too and, while the device is overloaded, are dropped as
late like a camera's (their callers get the frame answered with the reason): they used to be exempt and keep
deadline order, so a flood of DetectImage calls ran ahead of every camera. Below capacity a late pushed frame
runs (an SLO miss): its caller waits for that very frame and nobody else loses one. A 12-MP phone JPEG takes
~50 ms to decode on the 2-core VM, so it reaches an idle server's scheduler already past a 45 ms objective, and
"overloaded" would be a false answer. For the overload order every stream has a fairness `group`:
a camera is its own, all one-off DetectImage streams share one, so images together get one camera's share.

A camera's next frame may run while its previous one still runs (on another instance): no stream
waits behind its own batch, so under overload every stream gets the same share of the engine (with one
frame per stream in flight, a stream alone in a short batch was served several times as often as
streams sharing a long one). Results stay in frame order per stream: the core discards a result that
arrives after a newer one of its stream was published (dropped as "superseded"). Push streams are
`exclusive`: one frame in flight, every frame answered in order. Under load frames accumulate while all
instances are busy, so batches grow exactly when batching pays; when idle a frame runs at once."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate, islice

from .costmodel import RunTimeModel
from .frames import Frame, now
from .mailbox import Mailbox

__all__ = ["Batch", "DeadlineScheduler", "Scheduler", "SchedulerStats"]

DropCallback = Callable[[Frame, str], None]
ARRIVAL_WINDOW_S = 1.0  # the offered frame rate (overload or not) is counted over this long
RAN_MARGIN = 1.25  # offered over run frames/s beyond which a device is overloaded whatever its engine's estimate
ADMIT_LEAD = 1.0  # under measured overload a camera hands over frames from this many SLOs before its turn is due
NO_LEAD_S = 3600.0  # frames given longer than this (predict's, which have no deadline) are never shed
SHED_AHEAD_SHARE, SHED_AHEAD_MAX_S = 0.75, 0.25  # shed_for: this share of the time until a group's turn, at most
ADMISSION_EVERY_S = 0.1  # how often a pick re-reads the offered and run rates for admission


@dataclass
class Batch:
    """The scheduler -> worker contract: same-shape frames to run together, and what the scheduler expected."""

    frames: list[Frame]
    shape: tuple[int, int]
    predicted_s: float
    scheduled_at: float = field(default_factory=now)
    others: int = 0  # batches already running on the device when this one started
    seq: int = 0  # the device's batch counter at its start (batches started later ran beside it); 0: not scheduled

    @property
    def size(self) -> int:
        """Frames in the batch."""
        return len(self.frames)


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot for metrics and status: frames waiting in mailboxes, frames running, streams served, and the
    frames cameras shed under overload so far (Stream.admit)."""

    queued: int
    in_flight: int
    streams: int
    shed: int = 0


class Scheduler(ABC):
    """What a device worker needs from a batching policy. All methods are thread-safe."""

    def admits(self, group: str) -> bool:
        """Should a camera of fairness `group` hand over the frame it has now (see Stream.admit)? Lock-free: a camera
        thread asks this per frame."""
        return True

    def shed_for(self, group: str) -> float:
        """After `admits(group)` said no: how long (seconds) the group's frames will surely go on being shed, so that a
        camera making its own frames (a synthetic one) need not tick for them; 0 when there is no such estimate."""
        return 0.0

    def note_shed(self, n: int = 1) -> None:  # noqa: B027 - a policy without admission control needs no count
        """`n` of a camera's frames were not handed over (`admits` said no): offered load all the same."""

    @abstractmethod
    def add_stream(self, stream_id: str, capacity: int = 1, exclusive: bool = False, epoch: int = 0,
                   group: str | None = None) -> None:
        """Start serving incarnation `epoch` of a stream: `capacity` frames may wait; `exclusive`: never two of its
        frames running at once (push calls, answered strictly in order); `group`: the streams that share one
        turn under overload (default: its own). Another incarnation of the id is replaced: its frames still
        running are no longer counted as the stream's."""

    @abstractmethod
    def remove_stream(self, stream_id: str, epoch: int | None = None) -> list[Frame]:
        """Stop serving a stream (only incarnation `epoch`, when given); return its waiting frames (the caller
        drops or moves them)."""

    @abstractmethod
    def submit(self, frame: Frame) -> Frame | None:
        """Offer a frame; returns the frame it superseded (already counted as dropped by the caller), or the frame
        itself when its stream's incarnation is not served here (removed, moved, or added again since)."""

    @abstractmethod
    def schedule(self, timeout: float) -> Batch | None:
        """Block up to `timeout` seconds for work; return the next batch, or None."""

    @abstractmethod
    def update_from_output(self, batch: Batch, elapsed_s: float | None) -> None:
        """The batch finished (elapsed_s None: it failed): learn its run time, release its streams."""

    @abstractmethod
    def stats(self) -> SchedulerStats:
        """Queue depth and in-flight counts now."""

    @abstractmethod
    def shutdown(self) -> None:
        """Wake every waiting worker; `schedule` returns None from now on."""


@dataclass
class _StreamSlot:
    mailbox: Mailbox = field(default_factory=Mailbox)
    exclusive: bool = False
    epoch: int = 0  # the incarnation served: frames and finished batches of another one do not count here
    group: str = ""  # fairness under overload: streams of one group share one turn (DetectImage's one-off streams)
    in_flight: int = 0


class DeadlineScheduler(Scheduler):
    """Earliest-deadline-first, largest batch that still meets the earliest deadline (see the module docstring)."""

    walk_from = 64  # ready streams from which an overloaded pick walks the turn order instead of sorting them all

    def __init__(self, cost: RunTimeModel, max_batch: int, process_late: bool = False,
                 on_drop: DropCallback | None = None, clock: Callable[[], float] = now, probe_s: float = 1.0) -> None:
        self.cost = cost
        self.probe_s = probe_s
        self._last_probe: dict[tuple[int, int], float] = {}
        self.max_batch = max(1, int(max_batch))
        self.process_late = process_late
        self.on_drop = on_drop or (lambda frame, reason: None)
        self.clock = clock
        self._slots: dict[str, _StreamSlot] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._idle = 0  # worker threads waiting in schedule(): ready frames are shared among them
        self._running = 0  # batches running now: each prediction is for a run beside that many
        self._most_running = 1
        self._started = 0
        self._frames_running = 0  # frames of every batch picked and not yet finished, whatever became of their streams
        self._arrivals: deque[float] = deque()  # when the last ARRIVAL_WINDOW_S of frames came
        self._ran: deque[tuple[float, int]] = deque()  # (when, frames) of the batches started in that window
        self._ran_frames = 0
        self._first_pick: float | None = None
        self._shed = 0  # frames the cameras did not hand over (note_shed): a plain count, read every ADMISSION_EVERY_S
        self._shed_marks: deque[tuple[float, int]] = deque()  # (when, _shed) over the last ARRIVAL_WINDOW_S
        self._admission_at = float("-inf")
        self._measured_over = False  # more frames came (handed over or not) than RAN_MARGIN times those that ran:
        # admission control on (admits)
        self._admit_until = float("inf")  # groups whose last turn is later than this shed their frames (admits)
        self._ready: dict[str, _StreamSlot] = {}  # streams with a frame waiting: a pick looks at these, not at all
        # Groups in the order of their last turn, longest ago first (never served: first), with when it was and
        # their streams: under overload a pick walks the front of this instead of sorting every ready frame.
        self._turns: OrderedDict[str, float] = OrderedDict()
        self._members: dict[str, dict[str, _StreamSlot]] = {}

    def add_stream(self, stream_id: str, capacity: int = 1, exclusive: bool = False, epoch: int = 0,
                   group: str | None = None) -> None:
        with self._cond:
            slot = self._slots.get(stream_id)
            if slot is None or slot.epoch != epoch:
                if slot is not None:
                    self._forget(stream_id, slot)
                slot = self._slots[stream_id] = _StreamSlot(Mailbox(capacity), exclusive, epoch, group or stream_id)
                members = self._members.get(slot.group)
                if members is None:  # a group never served goes first (see _overloaded)
                    members = self._members[slot.group] = {}
                    self._turns[slot.group] = float("-inf")
                    self._turns.move_to_end(slot.group, last=False)
                members[stream_id] = slot

    def remove_stream(self, stream_id: str, epoch: int | None = None) -> list[Frame]:
        with self._cond:
            slot = self._slots.get(stream_id)
            if slot is None or (epoch is not None and slot.epoch != epoch):
                return []  # another incarnation is served now: not this caller's to remove
            del self._slots[stream_id]
            self._forget(stream_id, slot)
            frames = []
            while (frame := slot.mailbox.take()) is not None:
                frames.append(frame)
            return frames

    def _forget(self, stream_id: str, slot: _StreamSlot) -> None:
        """Take a slot out of the ready set and its group (a group's turn lives as long as one of its streams)."""
        if self._ready.get(stream_id) is slot:
            del self._ready[stream_id]
        members = self._members.get(slot.group)
        if members is not None and members.get(stream_id) is slot:
            del members[stream_id]
            if not members:
                del self._members[slot.group]
                del self._turns[slot.group]

    def submit(self, frame: Frame) -> Frame | None:
        with self._cond:
            slot = self._slots.get(frame.stream_id)
            if slot is None or slot.epoch != frame.epoch or self._closed:
                return frame  # the stream is gone (removed, moved or added again): the frame goes nowhere
            old = slot.mailbox.put(frame)
            self._ready[frame.stream_id] = slot
            self._count_arrivals(self.clock(), arrived=True)
            if not (slot.exclusive and slot.in_flight):
                self._cond.notify()
            return old

    def admits(self, group: str) -> bool:
        return self._turns.get(group, float("-inf")) <= self._admit_until

    def shed_for(self, group: str) -> float:
        # `_admit_until` (a turn time) moves at about real time under steady overload (every group's turn comes once
        # per cycle), so a group is admitted again in about its last turn's lead over it; a share of that, capped, so
        # that a camera is back before its turn when the engine speeds up or admission is lifted.
        lead = self._turns.get(group, float("-inf")) - self._admit_until
        return min(SHED_AHEAD_SHARE * lead, SHED_AHEAD_MAX_S) if lead > 0 else 0.0

    def note_shed(self, n: int = 1) -> None:
        self._shed += n  # no lock (a camera thread calls this per frame): a lost count only blurs an estimate

    def schedule(self, timeout: float) -> Batch | None:
        late: list[Frame] = []
        end = self.clock() + timeout
        with self._cond:
            self._idle += 1
            try:
                while not self._closed:
                    batch = self._pick(self.clock(), late)
                    if batch is not None:
                        break
                    remaining = end - self.clock()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                else:
                    batch = None
            finally:
                self._idle -= 1
        for frame in late:
            self.on_drop(frame, "late")
        return batch

    def _pick(self, t: float, late: list[Frame]) -> Batch | None:
        busy = self._running  # a batch started now runs beside these (and is as slow as it will be then)
        lone: dict[tuple[int, int], tuple[float, float]] = {}  # shape -> (typical run as now, best of that and alone)
        if t - self._admission_at >= ADMISSION_EVERY_S:
            self._admission(t)
        overloaded = over = self._overloaded(t, busy)  # over: the device's state; overloaded: the order of this pick
        ready = None
        if overloaded and len(self._ready) > self.walk_from:
            ready = self._walk_turns(t, late, busy, lone)  # None: a frame runs late anyway, deadline order instead
            overloaded = ready is not None
        if ready is None:
            ready = [(frame, slot) for slot in list(self._ready.values())
                     if (frame := self._admit(slot, t, late, busy, lone, over)) is not None]
            if overloaded and any(t + lone[f.shape][0] > f.deadline for f, _ in ready):
                overloaded = False  # a frame that runs late anyway (the SLO is out of reach, a probe): oldest first
        if not ready:
            self._admit_until = float("inf")  # nothing to run: every camera's next frame is wanted (until a pick)
            return None
        if overloaded:  # the group served longest ago, newest frame
            turns = self._turns

            def order(fs: tuple[Frame, _StreamSlot]) -> tuple[float, float]:
                return (turns[fs[1].group], -fs[0].deadline)
        else:
            def order(fs: tuple[Frame, _StreamSlot]) -> tuple[float, float]:
                return (0.0, fs[0].deadline)
        first = min(ready, key=order)[0]
        shape = first.shape
        walked = sorted((fs for fs in ready if fs[0].shape == shape), key=order)
        share = -(-len(walked) // self._idle) if self._idle > 1 else len(walked)  # leave work for idle instances
        group = walked[:min(self.max_batch, share)]
        predict = self.cost.predict
        n = 1
        if t + lone[shape][0] > first.deadline:
            # late whatever we do: throughput, then latency
            n = self._efficient_batch(len(group), shape, busy)
            if n > 1 and self._probe(shape, busy, t):
                n = 1  # re-measure a lone frame now and then: a stale, slow estimate must not keep us here for good
        else:
            earliest = list(accumulate((f.deadline for f, _ in group), min))  # the first k frames' earliest deadline
            for k in range(len(group), 1, -1):
                if t + predict(k, shape, 0.9, busy) <= earliest[k - 1]:
                    n = k
                    break
            if overloaded and n < len(group):
                group, n = self._fullest(walked, len(group), n, shape, busy, t)
        frames = []
        for frame, slot in group[:n]:
            slot.mailbox.take()
            if not slot.mailbox:
                del self._ready[frame.stream_id]
            slot.in_flight += 1
            if self._turns.get(slot.group, t) != t:  # its turn now: to the back of the order
                self._turns[slot.group] = t
                self._turns.move_to_end(slot.group)
            frames.append(frame)
        if self._measured_over:  # admitted: the groups next in turn order, as many as run frames in ADMIT_LEAD SLOs
            lead_s = ADMIT_LEAD * (first.deadline - first.ingest_time)
            k = max(self.max_batch, int(self._ran_frames / ARRIVAL_WINDOW_S * lead_s)) if lead_s < NO_LEAD_S else 0
            self._admit_until = next(islice(self._turns.values(), k - 1, None), float("inf")) if k else float("inf")
        self._ran.append((t, n))
        self._ran_frames += n
        if self._first_pick is None:
            self._first_pick = t
        self._running += 1
        self._frames_running += n
        self._most_running = max(self._most_running, self._running)
        self._started += 1
        return Batch(frames, shape, predict(n, shape, 0.9, busy), t, busy, self._started)

    def _fullest(self, walked: list[tuple[Frame, _StreamSlot]], most: int, n: int, shape: tuple[int, int],
                 busy: int, t: float) -> tuple[list[tuple[Frame, _StreamSlot]], int]:
        """Under overload, a batch of more than the `n` frames that turn order fits before its earliest deadline: the
        largest k (up to `most`) for which k of the `walked` frames (in turn order) can wait for a run of k, taken in
        that order. Past capacity frames are lost whatever runs; a frame nearly due (one handed over a tick before
        its turn) shrank the batch around it to a few frames, and the host path's cost per batch then cut what
        ran (1,144 cameras on the 2-core VM: mean batch 8-15 of 32). Skipped frames keep their turn: a fresher frame
        of theirs goes first at the next pick."""
        due = sorted((f.deadline for f, _ in walked), reverse=True)
        predict = self.cost.predict
        for k in range(min(most, len(due)), n, -1):
            if (need := t + predict(k, shape, 0.9, busy)) <= due[k - 1]:
                return [fs for fs in walked if fs[0].deadline >= need][:k], k
        return walked, n

    def _admit(self, slot: _StreamSlot, t: float, late: list[Frame], busy: int,
               lone: dict[tuple[int, int], tuple[float, float]], overloaded: bool) -> Frame | None:
        """A ready stream's next frame if it may run now; frames that cannot meet their deadline are taken into
        `late` (dropped) until one can, unless it runs to re-measure the model (a probe), could never be on
        time anyway, or is a pushed frame (its caller waits for it) while the device is not overloaded. A push
        stream's window can hold several: a late one must not hide the next."""
        if slot.exclusive and slot.in_flight:
            return None
        while (frame := slot.mailbox.peek()) is not None:
            shape = frame.shape
            if (known := lone.get(shape)) is None:
                typical = self.cost.predict(1, shape, 0.5, busy)
                known = lone[shape] = (typical, min(typical, self.cost.predict(1, shape, 0.5)))  # alone, or as now
            typical, best = known
            feasible = best <= frame.deadline - frame.ingest_time  # could a frame of this shape be on time at all?
            if (self.process_late or not feasible or t + typical <= frame.deadline
                    or not (frame.droppable or overloaded) or (t < frame.deadline and self._probe(shape, busy, t))):
                return frame
            late.append(slot.mailbox.take())
            if not slot.mailbox:
                del self._ready[frame.stream_id]  # its turn stays where it was: a late frame was no turn
        return None

    def _walk_turns(self, t: float, late: list[Frame], busy: int,
                    lone: dict[tuple[int, int], tuple[float, float]]) -> list[tuple[Frame, _StreamSlot]] | None:
        """Under overload, the ready frames a batch is made of without looking at every stream: groups in the
        order of their turns, longest ago first, until a batch's worth of frames of the first one's shape that can
        wait for a run of a batch is found and the groups whose turn came at the same time are all seen (their
        newest frame goes first). Hundreds
        of cameras over capacity made every pick sort them all (1.2 ms a pick at 1,024 cameras on the 2-core VM:
        the interpreter lock the engine workers needed). None when a frame runs late anyway: deadline order."""
        want = self.max_batch if self._idle <= 1 else min(self.max_batch, -(-len(self._ready) // self._idle))
        ready: list[tuple[Frame, _StreamSlot]] = []
        block = shape = None
        need, enough = 0.0, 0  # of the first frame's shape, frames that can wait for a run of `want` (`_fullest`)
        for group, turn in self._turns.items():
            if turn != block:
                if ready and shape is None:  # the first block with a frame: its newest frame goes first
                    shape = max(ready, key=lambda fs: fs[0].deadline)[0].shape
                    need = t + self.cost.predict(want, shape, 0.9, busy)
                    enough = sum(f.shape == shape and f.deadline >= need for f, _ in ready)
                if enough >= want:
                    break
                block = turn
            for slot in self._members[group].values():
                if slot.mailbox and (frame := self._admit(slot, t, late, busy, lone, True)) is not None:
                    if t + lone[frame.shape][0] > frame.deadline:
                        return None
                    ready.append((frame, slot))
                    enough += frame.shape == shape and frame.deadline >= need
        return ready

    def _overloaded(self, t: float, busy: int) -> bool:
        """Do cameras offer more frames per second than the device's instances can run (each at its best batch)?

        Then frames are lost whatever runs first, and in deadline order every result comes just inside the
        SLO, where a slow run pushes it out, and a camera whose frames always come just after another's can
        starve. So under overload the camera served longest ago goes first (its newest frame; among cameras
        never served, the newest frame). 12 synthetic cameras at 1.5x capacity on 2 CPU cores, 12 s windows
        (server subprocess, gRPC watcher): deadline order p50 36-39 ms, p99 47-53, fewest results of one
        camera 0-29; newest first p50 28-33, fewest 10-30; this order p50 31-35, fewest 40-62 (of ~75 each,
        the fair share), same results/s within the noise. Below capacity deadline order stays: it loses
        nothing a burst can be saved from. Pushed frames count as offered load and take turns like cameras (all
        DetectImage calls as one group). Overloaded too: a second in which RAN_MARGIN times fewer frames started
        than came, whatever the engine's estimate says; a fast engine's host path (picking, letterboxing,
        publishing, camera ticks) is then the limit, which the engine's run times do not show (a model that
        costs nothing, 1,024 cameras: every pick sorted them all by deadline)."""
        if len(self._ready) < 2:
            return False
        if self._measured_over:
            return True  # measured: far fewer frames run than come, whatever the engine's estimate (the host's limit)
        self._count_arrivals(t)
        shape = next(iter(self._ready.values())).mailbox.peek().shape
        predict = self.cost.predict
        one = max(predict(1, shape, 0.5, busy), 1e-9)
        offered = len(self._arrivals) / ARRIVAL_WINDOW_S
        if offered <= self._most_running / one:
            return False  # the instances keep up one frame at a time: no need to price the batches
        best = max((n / max(predict(n, shape, 0.5, busy), 1e-9) for n in range(2, self.max_batch + 1)),
                   default=0.0)
        return offered > self._most_running * max(1.0 / one, best)

    def _admission(self, t: float) -> None:
        """Re-read the offered (handed over or shed) and started frames of the last second: is the device overloaded
        by measure, and should cameras shed the frames that cannot run (`admits`)?

        Past capacity most of a camera's frames are lost whatever the order. Handing each over anyway costs the host
        path per frame (a letterbox plan, a Frame, this lock, a drop): 1,024 cameras offering 4x what two device
        processes ran cost them a quarter of their frames/s. Turns come to groups in order (the one served longest
        ago first), so after each pick only the groups next in that order, as many as the instances run frames in
        ADMIT_LEAD SLOs, hand over frames (fresh when their turn comes); the others cost a count. (Admitting the
        groups whose last turn was within ADMIT_LEAD SLOs of the latest previous turn served let the turns a pick
        passes over pull that mark ahead: 1,144 cameras on one process, 2-core AMD EPYC VM, handed over ~6 frames per
        frame run, against 1.4 so.) A pick that finds nothing to run lifts admission until the next batch (it must
        never starve the engine), and the shed frames count as offered, so admission does not hide the overload that
        started it."""
        self._admission_at = t
        self._count_arrivals(t)
        while self._ran and self._ran[0][0] < t - ARRIVAL_WINDOW_S:
            self._ran_frames -= self._ran.popleft()[1]
        marks = self._shed_marks
        marks.append((t, self._shed))
        while marks[0][0] < t - ARRIVAL_WINDOW_S:
            marks.popleft()
        offered = len(self._arrivals) + self._shed - marks[0][1]
        ran = self._ran_frames
        self._measured_over = (self._first_pick is not None and t - self._first_pick >= ARRIVAL_WINDOW_S
                               and offered > RAN_MARGIN * ran)
        if not self._measured_over:
            self._admit_until = float("inf")

    def _count_arrivals(self, t: float, arrived: bool = False) -> None:
        if arrived:
            self._arrivals.append(t)
        while self._arrivals and self._arrivals[0] < t - ARRIVAL_WINDOW_S:
            self._arrivals.popleft()

    def _probe(self, shape: tuple[int, int], busy: int, t: float) -> bool:
        """Run a lone frame of `shape` now to re-measure it? Yes if its estimate is stale and no probe is recent."""
        if self.cost.age(1, shape, busy) < self.probe_s or t - self._last_probe.get(shape, -1e9) < self.probe_s:
            return False
        self._last_probe[shape] = t
        return True

    def _efficient_batch(self, most: int, shape: tuple[int, int], busy: int) -> int:
        """The smallest batch with 95% of the best frames/s up to `most`: large where batching pays (GPUs), 1 where
        it does not (CPUs), since a bigger batch there only adds latency."""
        rates = [k / max(self.cost.predict(k, shape, 0.5, busy), 1e-9) for k in range(1, most + 1)]
        best = max(rates)
        return next(k for k, r in enumerate(rates, 1) if r >= 0.95 * best)

    def update_from_output(self, batch: Batch, elapsed_s: float | None) -> None:
        with self._cond:
            if elapsed_s is not None:  # it ran beside those running at its start and those started since
                beside = min(batch.others + self._started - batch.seq, self._most_running - 1)
                self.cost.observe(batch.size, batch.shape, elapsed_s, beside)
            if batch.seq == 0:  # not started by schedule() (a probe, a test): nothing to release
                self._cond.notify_all()
                return
            self._running -= 1
            self._frames_running -= batch.size
            assert self._running >= 0 and self._frames_running >= 0, f"batch {batch.seq} finished twice"
            for frame in batch.frames:
                slot = self._slots.get(frame.stream_id)
                if slot is not None and slot.epoch == frame.epoch:  # not a newer incarnation's count
                    slot.in_flight -= 1
                    assert slot.in_flight >= 0, f"{frame.stream_id}: more frames finished than started"
            self._cond.notify_all()

    def stats(self) -> SchedulerStats:
        with self._cond:
            queued = sum(len(s.mailbox) for s in self._slots.values())
            return SchedulerStats(queued, self._frames_running, len(self._slots), self._shed)

    def shutdown(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
