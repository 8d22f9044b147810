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


def test_a_flapping_source_that_then_stays_up_is_said_to_work_again(caplog):
    """A camera that drops every few seconds, then streams for good: its last line must not be a failure. The
    source calls ok() at every frame; once it has worked for first_summary_s the episode ends, said once."""
    caplog.set_level(logging.INFO, "test.faultlog")
    faults = FaultLog(logging.getLogger("test.faultlog"), "stream %s", ("cam0",), first_summary_s=0.2)
    for _ in range(5):
        faults.failed("server ended the stream", "; reconnecting")
        faults.ok("streaming again")
    assert lines(caplog)[-1] == "stream cam0: server ended the stream; reconnecting"  # it works meanwhile
    end = time.monotonic() + 0.5
    while time.monotonic() < end:  # frames flow
        faults.ok("streaming again")
        time.sleep(0.01)
    said = lines(caplog)
    assert said[-1].startswith("stream cam0: streaming again after 5 failures over "), said
    assert len(said) == 4 and not faults.failing, said
    faults.failed("server ended the stream", "; reconnecting")  # a new episode, said at once
    assert lines(caplog)[-1] == "stream cam0: server ended the stream; reconnecting"


def test_a_lone_failure_below_recovery_after_stays_unsaid_when_steady(caplog):
    caplog.set_level(logging.INFO, "test.faultlog")
    faults = FaultLog(logging.getLogger("test.faultlog"), "%s: engine runs", ("cpu",), logging.ERROR,
                      recovery_after=2, first_summary_s=0.1)
    faults.failed("RuntimeError: once")
    for _ in range(30):
        faults.ok("work again")
        time.sleep(0.01)
    assert lines(caplog) == ["cpu: engine runs: RuntimeError: once"] and faults.failures == 0
