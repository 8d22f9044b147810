"""The tracker alone (tracking.py): ids that follow parts on a belt through gaps, not through time-outs or flicker."""

from __future__ import annotations

import numpy as np

from yolov12_serve.tracking import Tracker, box_iou


def part(x: float, y: float, w: float = 40, h: float = 30, cls: int = 0, score: float = 0.9) -> list[float]:
    return [x, y, x + w, y + h, score, cls]


def run(tracker: Tracker, frames: list[tuple[float, list[list[float]]]]) -> tuple[list[list[int]], list[int]]:
    """Each frame's ids, and every class confirmed, in order."""
    ids, confirmed = [], []
    for t, dets in frames:
        got, new = tracker.update(np.array(dets, np.float32).reshape(-1, 6), t)
        ids.append(got.tolist())
        confirmed += new
    return ids, confirmed


def test_a_part_on_a_belt_keeps_one_id_and_is_counted_once():
    frames = [(i / 25, [part(600 - 6 * i, 100)]) for i in range(40)]
    ids, confirmed = run(Tracker(), frames)
    assert ids[0] == [0]  # one sighting is not an object yet
    assert all(f == [1] for f in ids[1:]), ids
    assert confirmed == [0]


def test_two_parts_side_by_side_and_two_classes_crossing_keep_their_own_ids():
    # two of one class 60 px apart moving left; a part of another class moving right through them
    frames = [(i / 25, [part(300 - 6 * i, 100), part(360 - 6 * i, 100), part(100 + 8 * i, 100, cls=1)])
              for i in range(40)]
    ids, confirmed = run(Tracker(), frames)
    assert all(f == [1, 2, 3] for f in ids[1:]), ids
    assert sorted(confirmed) == [0, 0, 1]


def test_dropped_frames_and_a_fast_part_are_bridged_by_its_velocity():
    """A part moving 30 px a frame (most of its 40 px width) loses half a second of frames under overload: where
    it was last seen it no longer overlaps, where its velocity puts it, it does."""
    frames = [(i / 25, [part(1000 - 30 * i, 100)]) for i in range(30) if not 10 <= i < 22]
    ids, _ = run(Tracker(), frames)
    assert all(f == [1] for f in ids[1:]), ids
    after_gap = Tracker(min_iou=0.2)
    run(after_gap, frames[:10])
    predicted_shift = after_gap._velocity[0] * (22 - 9) / 25
    assert np.allclose(predicted_shift, [-30 * 13, 0], atol=1e-3)  # 30 px a frame, measured from its boxes


def test_a_part_moving_further_than_its_width_between_its_first_frames_is_still_one_object():
    """No velocity is known at the second sighting and the boxes do not overlap: the centre-distance match (within
    the box's larger side) takes it."""
    frames = [(i / 5, [part(900 - 45 * i, 100, w=30, h=60)]) for i in range(6)]  # 45 px a frame, 30 px wide
    assert box_iou(np.array([part(900, 100, 30, 60)[:4]]), np.array([part(855, 100, 30, 60)[:4]]))[0, 0] == 0
    ids, confirmed = run(Tracker(), frames)
    assert all(f == [1] for f in ids[1:]) and confirmed == [0], ids


def test_a_part_gone_longer_than_max_age_comes_back_as_a_new_object():
    frames = [(i / 25, [part(300, 100)]) for i in range(5)] + [(2.0 + i / 25, [part(300, 100)]) for i in range(5)]
    ids, confirmed = run(Tracker(max_age_s=1.0), frames)
    assert ids[1:5] == [[1]] * 4 and ids[5] == [0] and ids[6:] == [[2]] * 4, ids
    assert confirmed == [0, 0]


def test_a_camera_at_one_frame_a_second_keeps_its_parts_ids():
    """At 1 fps each frame comes just after max_age_s (1 s): a part seen in the previous frame keeps its id (every
    track used to be forgotten there, and no part was ever counted); one missing from a frame is still let go."""
    frames = [(i * 1.003, [part(600 - 40 * i, 100)]) for i in range(8)]
    ids, confirmed = run(Tracker(), frames)
    assert ids[0] == [0] and all(f == [1] for f in ids[1:]) and confirmed == [0], ids
    frames[4] = (frames[4][0], [])  # not in one frame: 2 s unseen, two frame intervals
    ids, confirmed = run(Tracker(), frames)
    assert ids[1:4] == [[1]] * 3 and ids[5] == [0] and ids[6:] == [[2]] * 2, ids


def test_a_one_frame_flicker_never_becomes_an_object():
    frames = [(i / 25, [part(300 - 6 * i, 100)] + ([part(50, 200, cls=2)] if i == 7 else [])) for i in range(20)]
    ids, confirmed = run(Tracker(), frames)
    assert ids[7] == [1, 0] and confirmed == [0], ids  # the flicker is published without an id, never counted


def test_no_detections_and_an_empty_tracker_are_fine():
    tracker = Tracker()
    ids, confirmed = tracker.update(np.zeros((0, 6), np.float32), 0.0)
    assert ids.shape == (0,) and confirmed == [] and len(tracker) == 0
    run(tracker, [(0.0, [part(10, 10)]), (0.04, [])])
    assert len(tracker) == 1  # kept until max_age_s
    tracker.update(np.zeros((0, 6), np.float32), 5.0)
    assert len(tracker) == 0


def test_a_class_is_part_of_an_object_s_identity():
    """A box that reads as another class from one frame on is another object, counted in that class (a defect box
    lies on its part's box: one track for both would hand the part's id to the defect)."""
    frames = [(i / 25, [part(300 - 6 * i, 100, cls=0 if i < 10 else 1)]) for i in range(20)]
    ids, confirmed = run(Tracker(), frames)
    assert ids[9] == [1] and ids[10] == [0] and ids[11:] == [[2]] * 9, ids
    assert confirmed == [0, 1]


def test_a_weak_detection_continues_an_object_but_never_starts_one():
    """A model's weak boxes (duplicates, flicker) would each be an object: below new_track_score a detection can
    only carry on a track that a confident one started."""
    frames = [(i / 25, [part(300 - 6 * i, 100, score=0.9 if i < 3 else 0.3),  # a part whose score then drops
                        part(100, 250, cls=1, score=0.3)])  # a weak box that stays put
              for i in range(12)]
    ids, confirmed = run(Tracker(new_track_score=0.5), frames)
    assert all(f == [1, 0] for f in ids[1:]) and confirmed == [0], ids
    ids, confirmed = run(Tracker(new_track_score=0.0), frames)
    assert sorted(ids[1]) == [1, 2] and sorted(confirmed) == [0, 1], ids  # without the rule: two objects


def test_a_class_given_a_lower_score_of_its_own_starts_objects_from_it():
    """class_min_scores {crack: 0.3} on a tracked camera with --track-min-score 0.5: a crack scoring 0.35 was
    published with track id 0 (never an object: not counted, no evidence, no MQTT object). The class's own score
    starts its objects; other classes keep the server's."""
    from yolov12_serve.filters import DetectionFilter

    names = {0: "scratch", 1: "crack"}
    dets = [part(100, 100, cls=1, score=0.35), part(300, 100, cls=0, score=0.35)]
    f = DetectionFilter(0.2, class_scores=(("crack", 0.3), ("scratch", 0.8)))
    starts = f.track_start_scores(np.array(dets, np.float32), names, 0.5)
    assert starts is not None and starts.tolist() == [np.float32(0.3), 0.5]  # scratch's own 0.8 is above: 0.5
    assert DetectionFilter(0.2, class_scores=(("scratch", 0.8),)).track_start_scores(
        np.array(dets, np.float32), names, 0.5) is None
    tracker, confirmed = Tracker(new_track_score=0.5), []
    for i in range(3):
        frame = np.array(dets, np.float32)
        confirmed += tracker.update(frame, i / 25, start_scores=f.track_start_scores(frame, names, 0.5))[1]
    assert confirmed == [1]  # the crack is an object; the weak scratch is not


def test_new_objects_yields_each_object_once_per_camera_and_afresh_after_a_restart():
    from yolov12_serve.client import new_objects
    from yolov12_serve.proto import detector_pb2 as pb

    def fd(sid: str, frame: int, *ids: int) -> pb.FrameDetections:
        return pb.FrameDetections(stream_id=sid, frame_id=frame, detections=[pb.Detection(track_id=i) for i in ids])

    results = [fd("a", 1, 0), fd("a", 2, 1, 0), fd("b", 2, 1), fd("a", 3, 1, 3),  # 2's first frame was not seen
               fd("a", 4, 1, 2, 3), fd("a", 0, 0), fd("a", 1, 1)]  # camera a numbers its frames from 0 again
    got = [(r.stream_id, r.frame_id, d.track_id) for r, d in new_objects(results)]
    assert got == [("a", 2, 1), ("b", 2, 1), ("a", 3, 3), ("a", 4, 2), ("a", 1, 1)]


def test_a_wall_clock_step_on_a_tracked_camera_neither_forgets_its_parts_nor_counts_them_again(monkeypatch):
    """The server tracks at each frame's monotonic ingest time: the host clock stepped an hour forwards, then two
    back (NTP correcting a wrong RTC), while a camera sees one standing part, still counts it once under one id
    (tracked at the wall-clock capture time, the step forwards forgot the track: the part was counted again)."""
    import time

    from test_scheduler import CostEngine
    from test_server_harness import ROOT

    from yolov12_serve.config import ServerConfig, StreamSpec
    from yolov12_serve.core import ServerCore

    offset_ns = 0
    wall = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: wall() + offset_ns)  # what a step of the host clock looks like
    config = ServerConfig(engines=[str(ROOT / "pyproject.toml")], devices=["cpu"], metrics_port=-1,
                          allow_synthetic=True, state_dir=None)
    core = ServerCore(config, load_engine=lambda path, device="cpu", instances=1, **opts: CostEngine(a=0.002, b=0.001))
    core.start()
    try:
        core.add_stream(StreamSpec("belt", "synthetic://belt?fps=20&size=320x180", track=True), persist=False)
        stream = core._streams["belt"]

        deadline = time.monotonic() + 10
        while stream.objects < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stream.objects == 1
        for step_s in (3600, -7200):
            offset_ns += step_s * 10**9
            time.sleep(0.5)  # ~10 frames after the step
            assert stream.objects == 1, f"after a step of {step_s} s the part was counted again"
        assert stream.tracker is not None and stream.tracker.next_id == 2
    finally:
        core.drain(2)


def test_a_frame_of_unknown_size_leaves_the_tracks_in_their_pixels():
    """src_hw (0, 0) (a size not known) neither collapses the tracks' boxes to the origin nor is taken as the size
    the next frame's change is measured from: the part keeps its id across it."""
    tracker = Tracker()
    box = np.array([[100.0, 100.0, 140.0, 140.0, 0.9, 0.0]])
    ids = [tracker.update(box, t, (360, 640))[0][0] for t in (0.0, 0.1)]
    ids.append(tracker.update(box, 0.2, (0, 0))[0][0])
    ids.append(tracker.update(box, 0.3, (360, 640))[0][0])
    assert ids == [0, 1, 1, 1]


def test_with_evidence_dir_the_skipped_series_exist_at_zero_from_the_start(tmp_path):
    """Yolov12EvidenceNotWritten is increase(yolov12_evidence_skipped_total[15m]): a series that appeared only at its
    first increment would start at that count, and the first pictures a full disk loses would not be seen."""
    from test_scheduler import CostEngine
    from test_server_harness import ROOT

    from yolov12_serve.config import ServerConfig
    from yolov12_serve.core import ServerCore

    config = ServerConfig(engines=[str(ROOT / "pyproject.toml")], devices=["cpu"], metrics_port=-1,
                          allow_synthetic=True, state_dir=None, evidence_dir=str(tmp_path / "evidence"))
    core = ServerCore(config, load_engine=lambda path, device="cpu", instances=1, **opts: CostEngine(a=0.002, b=0.001))
    core.start()
    try:
        text = core.metrics.exposition().decode()
        for reason in ("write failed", "busy", "no picture", "not in its pictures"):
            assert f'yolov12_evidence_skipped_total{{reason="{reason}"}} 0.0' in text, reason
    finally:
        core.drain(2)
