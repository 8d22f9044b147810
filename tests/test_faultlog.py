"""Repeating faults logged on change (faultlog.py): the lines a long outage, a new reason, a flapping source and a
recovery write, with a real logger."""

from __future__ import annotations

import logging
import time

from yolov12_serve.faultlog import FaultLog


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "test.faultlog"]


def test_an_outage_is_its_first_failure_new_reasons_growing_summaries_and_one_recovery(caplog):
    caplog.set_level(logging.INFO, "test.faultlog")
    faults = FaultLog(logging.getLogger("test.faultlog"), "stream %s", ("cam0",), first_summary_s=0.2,
                      max_summary_s=0.4)
    for _ in range(50):
        faults.failed("refused", "; reconnecting")
    assert lines(caplog) == ["stream cam0: refused; reconnecting"]
    faults.failed("timed out", "; reconnecting")  # a new reason is said at once
    faults.failed("refused", "; reconnecting")
    assert lines(caplog)[1:] == ["stream cam0: timed out; reconnecting"]
    time.sleep(0.25)
    faults.failed("refused", "; reconnecting")
    assert "stream cam0: still failing, 53 times since " in lines(caplog)[2] and "(last: refused)" in lines(caplog)[2]
    faults.failed("refused", "; reconnecting")
    assert len(lines(caplog)) == 3  # the next summary waits twice as long
    faults.ok("streaming again")
    faults.ok("streaming again")
    assert lines(caplog)[3].startswith("stream cam0: streaming again after 54 failures over ")
    assert len(lines(caplog)) == 4 and not faults.failing


def test_a_flapping_source_is_one_episode_not_a_line_pair_per_drop(caplog):
    caplog.set_level(logging.INFO, "test.faultlog")
    faults = FaultLog(logging.getLogger("test.faultlog"), "stream %s", ("cam0",), first_summary_s=60)
    for _ in range(100):
        faults.failed("server ended the stream")
        faults.ok("streaming again")
    said = lines(caplog)
    assert said == ["stream cam0: server ended the stream", "stream cam0: streaming again after 1 failure over 0 s "
                    "(last: server ended the stream)", "stream cam0: server ended the stream"], said


def test_a_single_failure_below_recovery_after_says_no_recovery(caplog):
    caplog.set_level(logging.INFO, "test.faultlog")
    faults = FaultLog(logging.getLogger("test.faultlog"), "%s: engine runs", ("cpu",), logging.ERROR,
                       recovery_after=2)
    faults.failed("RuntimeError: once")
    faults.ok("work again")
    assert lines(caplog) == ["cpu: engine runs: RuntimeError: once"]
