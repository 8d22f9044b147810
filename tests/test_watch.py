"""Batched fan-out (issue 28): WatchDetectionBatches delivers every result, in order per stream, at a rate where a
message per result (WatchDetections) loses most of them; a watcher that falls behind loses its own oldest, counted
in its own metric series, which goes when it disconnects. Against the real server (subprocess) serving a model
that costs nothing (tests/zero_model.py), so that the rate is set by the cameras, not by inference."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from pathlib import Path

import grpc
import numpy as np
import pytest
from test_server_harness import ServerProcess, wait_until
from zero_model import write_zero_model

from yolov12_serve.fanout import Fanout
from yolov12_serve.frames import FrameResult

pytestmark = pytest.mark.timeout(240)

CAMERAS = 40  # x 25 fps: 1,000 results a second offered
READ_COST_S = 0.005  # what each gRPC message costs the test's readers: at most 200 messages a second each


def result(stream: str, fid: int, boxes: int = 0) -> FrameResult:
    return FrameResult(stream, fid, np.zeros((boxes, 6), np.float32), (180, 320), 0, 0.01, "cpu")


# ------------------------------------------------------------------------------------------------ the queue
def test_next_batch_takes_every_waiting_result_and_says_how_many_were_lost():
    async def main():
        lost = []
        fan = Fanout(on_overflow=lambda sub, n: lost.append((sub.label, n)))
        sub = fan.subscribe(None, 5, asyncio.get_running_loop(), label="1 ipv4:10.0.0.9:5000")
        for i in range(3):
            fan.publish(result("a", i))
        first = await sub.next_batch()
        for i in range(3, 10):  # 7 into a queue of 5: the 2 oldest go
            fan.publish(result("b" if i % 2 else "a", i))
        second = await sub.next_batch()
        for i in range(10, 14):
            fan.publish(result("a", i, boxes=10))
        limited = await sub.next_batch(limit=3)
        weighed = await sub.next_batch(weigh=lambda r: len(r.detections), budget=5)  # at least one, over budget
        threading.Timer(0.05, lambda: fan.publish(result("a", 99))).start()
        woken = await asyncio.wait_for(sub.next_batch(), 2)  # parked on an empty queue, woken by a worker thread
        fan.unsubscribe(sub)
        return first, second, limited, weighed, woken, await sub.next_batch(), lost

    first, second, limited, weighed, woken, end, lost = asyncio.run(main())
    assert [r.frame_id for r in first[0]] == [0, 1, 2] and first[1] == 0
    assert [r.frame_id for r in second[0]] == [5, 6, 7, 8, 9] and second[1] == 2
    assert [r.frame_id for r in limited[0]] == [10, 11, 12] and limited[1] == 0
    assert [r.frame_id for r in weighed[0]] == [13]
    assert [r.frame_id for r in woken[0]] == [99]
    assert end is None
    assert lost == [("1 ipv4:10.0.0.9:5000", 1)] * 2


# ------------------------------------------------------------------------------------------------ the server
@pytest.fixture(scope="module")
def zero_model(tmp_path_factory) -> Path:
    return write_zero_model(tmp_path_factory.mktemp("zero") / "zero.onnx")


class SlowReader:
    """Reads a watch in a thread, paying READ_COST_S per gRPC message (a batch, or a result when per-result)."""

    def __init__(self, watch) -> None:
        self.watch = watch
        self.ids: dict[str, list[int]] = defaultdict(list)
        self.errors = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        seen = 0
        try:
            for fd in self.watch:
                self.ids[fd.stream_id].append(fd.frame_id)
                self.errors += bool(fd.error)
                messages = self.watch.messages if self.watch.batched else seen + 1
                if messages != seen:
                    seen = messages
                    time.sleep(READ_COST_S)
        except grpc.RpcError:
            pass

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.ids.values())


def test_batched_watch_delivers_every_result_in_order_where_per_result_watch_loses_them(zero_model):
    srv = ServerProcess("--max-streams", "64", "--max-batch", "32", "--subscriber-queue", "16", "--allow-synthetic",
                        model=zero_model)
    try:
        c = srv.client()
        c.wait_ready(60)
        batched, per_result = SlowReader(c.watch()), SlowReader(c.watch(batched=False))
        assert batched.watch.batched and not per_result.watch.batched
        for i in range(CAMERAS):
            c.add_stream(f"cam{i}", f"synthetic://cam{i}?fps=25&size=320x180")
        wait_until(lambda: all(s.state == 2 for s in c.list_streams()), 60, what="every camera streaming")
        metrics = srv.metrics()
        assert metrics.count("yolov12_watcher_results_dropped_total{") == 2  # a series per connected watcher
        time.sleep(6)
        processed = {sid: c.remove_stream(sid).frames_processed for sid in (f"cam{i}" for i in range(CAMERAS))}

        def settled():
            before = batched.total
            time.sleep(0.5)
            return batched.total == before
        wait_until(settled, 20, interval=0, what="the batched watcher settled")
        losses = [float(line.rsplit(" ", 1)[1]) for line in srv.metrics().splitlines()
                  if line.startswith("yolov12_watcher_results_dropped_total{")]  # the two watchers' own series
        batched.watch.cancel()
        per_result.watch.cancel()
        batched.thread.join(5)
        per_result.thread.join(5)
        assert batched.errors == 0 and batched.watch.dropped == 0
        for sid, n in processed.items():  # every result, in order (a result published as the stream went: +1)
            ids = batched.ids[sid]
            assert ids == sorted(set(ids)), f"{sid}: out of order or repeated"
            assert n <= len(ids) <= n + 2, f"{sid}: {len(ids)} delivered of {n} processed"
        for sid, ids in per_result.ids.items():
            assert ids == sorted(set(ids)), f"{sid}: out of order or repeated (per result)"
        total = sum(processed.values())
        assert total >= CAMERAS * 25  # at least a second's worth of every camera: the rate was there
        assert per_result.total < 0.8 * batched.total, (per_result.total, batched.total)  # a message per result loses
        assert len(losses) == 2 and min(losses) == 0 and max(losses) > 0  # who lost results, and who did not
        wait_until(lambda: "yolov12_watcher_results_dropped_total{" not in srv.metrics(), 10,
                   what="the watchers' series gone after they disconnected")
        assert "yolov12_subscriber_results_dropped_total" in srv.metrics()  # the sum over all stays
    finally:
        srv.close()
