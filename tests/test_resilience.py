"""Cameras never go blind (issue 27): stream incarnations, hung and failing engines, restarts, overload and engine
swaps, against the real server (subprocess, real ONNX engines behind fault switches: tests/fault_injection.py)
over loopback gRPC."""

from __future__ import annotations

import queue
import re
import threading
import time

import grpc
import pytest
from test_server_harness import ServerProcess, wait_until

pytestmark = pytest.mark.timeout(300)


def gauge(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in a /metrics exposition (None when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, flags=re.M)
    return float(m.group(1)) if m else None


class Reader:
    """Reads a watch in a thread into a queue (the test waits on the queue with its own deadlines)."""

    def __init__(self, watch) -> None:
        self.watch = watch
        self.results: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for fd in self.watch:
                self.results.put(fd)
        except grpc.RpcError:
            pass

    def first(self, predicate, timeout: float):
        """The first result satisfying `predicate` within `timeout` s (AssertionError otherwise)."""
        end = threading.Event()
        timer = threading.Timer(timeout, end.set)
        timer.start()
        try:
            while not end.is_set():
                try:
                    fd = self.results.get(timeout=0.1)
                except queue.Empty:
                    continue
                if predicate(fd):
                    return fd
        finally:
            timer.cancel()
        raise AssertionError(f"no such result within {timeout:.0f} s")

    def close(self) -> None:
        self.watch.cancel()


# ------------------------------------------------------------------------------------------------ incarnations
def test_an_id_re_added_while_its_frames_run_is_a_new_stream_every_time(tmp_path):
    """20 times: remove a camera while its frames run (each run made 50 ms longer) and add it again at another
    frame size. The new camera's first result is its frame 0 or 1 (within two frame intervals of its first
    frame): an old frame's result published into it used to make it drop every frame up to that id as
    superseded. In-flight counts never go negative and are back to 0 once the streams are gone (they used to
    reach -1, and a drain then waited its whole timeout)."""
    (tmp_path / "delay-cpu").write_text("0.08")  # with 10 fps cameras: a frame is in flight most of the time
    srv = ServerProcess("--slo-ms", "2000", "--instances", "2", faults=tmp_path)
    try:
        c = srv.client()
        c.wait_ready(30)
        sizes = [(320, 180), (640, 360)]
        firsts = []
        removed_in_flight = 0
        reader = None
        for i in range(20):
            w, h = sizes[i % 2]
            c.add_stream("cam", f"synthetic://cam{i}?fps=10&size={w}x{h}")
            reader = reader or Reader(c.watch(["cam"]))  # a watch of an id outlives its incarnations
            first = reader.first(lambda fd, w=w: fd.width == w, timeout=60)
            firsts.append(first.frame_id)
            reader.first(lambda fd, w=w, f=first.frame_id: fd.width == w and fd.frame_id >= f + 2, timeout=60)
            time.sleep(0.03)  # past the next frame's arrival: it runs now (removals right after a result found none)
            in_flight = gauge(srv.metrics(), "yolov12_frames_in_flight", device="cpu")
            assert in_flight is not None and in_flight >= 0, in_flight
            c.remove_stream("cam")
            removed_in_flight += in_flight > 0
        assert all(fid <= 1 for fid in firsts[1:]), firsts  # the first watch may start a frame late
        assert removed_in_flight >= 5, f"only {removed_in_flight} of 20 removals met a frame in flight"
        reader.close()

        def settled():
            value = gauge(srv.metrics(), "yolov12_frames_in_flight", device="cpu")
            assert value is not None and value >= 0, value
            return value == 0

        wait_until(settled, 30, what="no frame in flight")
        rc, _ = srv.terminate()
        assert rc == 0 and "drained" in srv.log()
        assert "AssertionError" not in srv.log()
    finally:
        srv.close()
