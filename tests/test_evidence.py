"""Evidence pictures (evidence.py): each counted object drawn on the picture of the frame it was seen in, asked for
again when it is not in that frame, never for a removed camera, and a folder that stays under its cap."""

from __future__ import annotations

import errno
import io
import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import file_size_limit
from PIL import Image

from yolov12_serve.drawing import PALETTE
from yolov12_serve.evidence import ATTEMPTS, EvidenceFolder, EvidenceRecorder, Picture, safe_name
from yolov12_serve.frames import FrameResult

NAMES = {0: "scratch", 1: "dent"}
GREY = np.full((120, 160, 3), 90, np.uint8)


def jpeg(picture: np.ndarray = GREY) -> bytes:
    out = io.BytesIO()
    Image.fromarray(picture).save(out, format="JPEG", quality=95)
    return out.getvalue()


def result(frame_id: int, rows: list[tuple[list[float], int]]) -> FrameResult:
    """A camera's published result: rows of ([x1, y1, x2, y2, score, class], track id)."""
    dets = np.array([d for d, _ in rows], np.float32).reshape(-1, 6)
    return FrameResult("cam/1", frame_id, dets, (120, 160), 1_796_000_000_000_000 + frame_id * 40_000, 0.01, "cpu",
                       model_version="demo.onnx@1a2b", track_ids=np.array([t for _, t in rows], np.int64))


class Camera:
    """take_picture: the frames a camera delivers, one per call (frame ids counting up), or None when it is down."""

    def __init__(self, first: int = 10, down: bool = False) -> None:
        self.next, self.down, self.calls = first, down, 0
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, stream_id: str) -> Picture | None:
        self.calls += 1
        self.gate.wait(10)
        if self.down:
            return None
        self.next += 1
        return Picture(jpeg(), self.next - 1)


def recorder(tmp_path: Path, camera: Camera, skipped: list | None = None) -> EvidenceRecorder:
    return EvidenceRecorder(EvidenceFolder(tmp_path, 10_000_000), camera,
                            on_skipped=lambda reason, n: (skipped if skipped is not None else []).append((reason, n)))


def settle(rec: EvidenceRecorder, sid: str = "cam/1") -> None:
    """Until the camera's picture has come (or it gave up)."""
    end = time.monotonic() + 10
    while sid in rec._asking and time.monotonic() < end:
        time.sleep(0.01)


def written(tmp_path: Path) -> dict[int, dict]:
    rec_files = sorted((tmp_path / safe_name("cam/1")).glob("*.json"))
    return {json.loads(p.read_text())["track_id"]: json.loads(p.read_text()) for p in rec_files}


def test_each_object_is_drawn_on_the_frame_its_picture_shows_and_asked_for_again_when_absent(tmp_path):
    camera = Camera(first=10)
    rec = recorder(tmp_path, camera)
    rec.objects("cam/1", [1, 2], [0, 1], NAMES)
    settle(rec)  # the picture of frame 10 is in hand
    rec.result(result(9, [([10, 10, 50, 50, 0.9, 0], 1)]))  # an older frame: not the one pictured
    rec.result(result(10, [([20, 30, 60, 70, 0.8, 0], 1), ([90, 20, 130, 60, 0.3, 1], 5)]))  # 2 is not in it
    settle(rec)  # asked again for 2: frame 11, whose result never comes (dropped): frame 12's is not its picture
    rec.result(result(12, [([100, 40, 140, 80, 0.7, 1], 2)]))
    settle(rec)  # so asked again: frame 12
    rec.result(result(12, [([104, 40, 144, 80, 0.7, 1], 2)]))
    rec.close()
    got = written(tmp_path)
    assert set(got) == {1, 2} and camera.calls == 3
    assert got[1]["frame_id"] == 10 and got[1]["box"] == [20, 30, 60, 70] and got[1]["class_name"] == "scratch"
    assert got[2]["frame_id"] == 12 and got[2]["box"][0] == 104 and got[2]["class_name"] == "dent"
    assert got[2]["stream_id"] == "cam/1" and got[2]["model_version"] == "demo.onnx@1a2b"
    picture = np.asarray(Image.open(tmp_path / "cam_1" / got[1]["picture"]))
    assert picture.shape == (120, 160, 3)
    edge = picture[45:65, 20].astype(int)  # the box's left edge, below its label
    assert np.abs(edge - PALETTE[0]).mean() < 40, edge  # drawn in its class's colour on the grey picture
    assert np.abs(picture[45:65, 40].astype(int) - 90).mean() < 10  # inside the box: the picture
    assert not rec.pending


def test_a_picture_that_comes_after_its_frame_s_result_still_finds_it(tmp_path):
    camera = Camera(first=7)
    camera.gate.clear()  # the picture is on its way...
    rec = recorder(tmp_path, camera)
    rec.objects("cam/1", [3], [1], NAMES)
    rec.result(result(7, [([5, 5, 40, 40, 0.6, 1], 3)]))  # ...while its frame's result is published
    camera.gate.set()
    settle(rec)
    rec.close()
    assert written(tmp_path)[3]["frame_id"] == 7


def test_an_object_never_seen_again_or_a_camera_that_is_down_is_counted_as_skipped(tmp_path):
    skipped: list = []
    camera = Camera(first=1)
    rec = recorder(tmp_path, camera, skipped)
    rec.objects("cam/1", [4], [0], NAMES)
    for _ in range(ATTEMPTS):
        settle(rec)
        rec.result(result(camera.next - 1, []))  # it left the frame
    assert skipped == [("not in its pictures", 1)] and camera.calls == ATTEMPTS and not rec.pending
    down = Camera(down=True)
    rec = recorder(tmp_path / "down", down, skipped)
    rec.objects("cam/1", [1, 2], [0, 0], NAMES)
    settle(rec)
    assert skipped[-1] == ("no picture", 2) and not rec.pending
    rec.close()
    assert not list(tmp_path.rglob("*.jpg"))


def test_a_full_disk_is_logged_on_change_not_once_per_object(tmp_path, caplog):
    """A full disk failed every picture with a warning each: a line per counted object for as long as the disk stays
    full. Now its first failure, summaries, and one line when pictures are written again; every one still counted."""
    caplog.set_level(logging.INFO, "yolov12_serve.evidence")
    skipped: list = []
    camera = Camera(first=1)
    rec = recorder(tmp_path, camera, skipped)

    def count(track: int) -> None:
        rec.objects("cam/1", [track], [0], NAMES)
        settle(rec)
        rec.result(result(camera.next - 1, [([10, 10, 50, 50, 0.9, 0], track)]))

    with file_size_limit(100):  # no picture fits: writes fail with EFBIG, as on a full disk
        for track in range(20):
            count(track)
        wait = time.monotonic() + 10
        while len(skipped) < 20 and time.monotonic() < wait:
            time.sleep(0.01)
    assert skipped == [("write failed", 1)] * 20
    count(99)
    rec.close()
    assert set(written(tmp_path)) == {99}
    lines = [r.getMessage() for r in caplog.records if r.name == "yolov12_serve.evidence"]
    assert len(lines) == 2, lines
    assert lines[0] == f"evidence under {tmp_path}: cam/1's pictures not written: OSError: File too large", lines
    assert lines[1].startswith(f"evidence under {tmp_path}: written again after 20 failures over "), lines


def test_a_removed_camera_s_objects_are_not_recorded(tmp_path):
    camera = Camera(first=3)
    camera.gate.clear()
    rec = recorder(tmp_path, camera)
    rec.objects("cam/1", [1], [0], NAMES)
    rec.forget("cam/1")  # removed while its picture was taken
    camera.gate.set()
    settle(rec)
    rec.result(result(3, [([5, 5, 40, 40, 0.9, 0], 1)]))
    rec.close()
    assert not written(tmp_path) and not rec.pending


def test_a_camera_removed_and_added_again_while_its_picture_was_taken_gets_a_picture_of_its_own(tmp_path):
    """The new incarnation numbers its frames anew: the picture asked for the old one (frame 100) must neither be
    used for it nor keep it from asking for its own (frame 5)."""
    release, calls = threading.Event(), []

    def take(stream_id: str) -> Picture:
        calls.append(stream_id)
        if len(calls) == 1:
            release.wait(10)
            return Picture(jpeg(), 100)  # the removed camera's frame
        return Picture(jpeg(), 5)

    rec = EvidenceRecorder(EvidenceFolder(tmp_path, 10_000_000), take)
    rec.objects("cam/1", [1], [0], NAMES)
    rec.forget("cam/1")
    rec.objects("cam/1", [1], [0], NAMES)  # added again, an object confirmed at once
    settle(rec)  # its own picture (frame 5) is in hand
    release.set()
    time.sleep(0.2)  # the stale answer arrives, and is dropped
    rec.result(result(5, [([30, 30, 70, 70, 0.9, 0], 1)]))
    rec.close()
    assert len(calls) == 2 and [r["frame_id"] for r in written(tmp_path).values()] == [5] and not rec.pending


def test_the_folder_stays_under_its_cap_oldest_first_counting_what_was_there(tmp_path):
    old = tmp_path / "a" / "old.jpg"
    old.parent.mkdir()
    old.write_bytes(b"x" * 400)
    folder = EvidenceFolder(tmp_path, 1000)
    assert folder.bytes == 400
    folder.write(tmp_path / "a" / "one.jpg", b"y" * 400)
    assert old.exists() and folder.bytes == 800
    folder.write(tmp_path / "b" / "two.jpg", b"z" * 400)  # 1,200 > 1,000: the oldest goes
    assert not old.exists() and (tmp_path / "a" / "one.jpg").exists() and folder.bytes == 800
    assert not list(tmp_path.rglob("*.part"))
    with pytest.raises(OSError):  # the file cannot be written (here: its name is taken by a folder)
        (tmp_path / "c" / "three.jpg").mkdir(parents=True)
        folder.write(tmp_path / "c" / "three.jpg", b"w" * 10)
    assert not list(tmp_path.rglob("*.part")) and folder.bytes == 800  # no half file, nothing counted


def test_a_full_disk_makes_room_by_removing_the_oldest_files(tmp_path, caplog):
    """--evidence-max-mb above the space the disk has: a write that finds the disk full removed nothing, so the
    newest defects were lost and the oldest kept. The oldest files now make room (at least twice the file and a
    twentieth of the folder), as a recorder overwrites its oldest footage; logged once a minute at most."""
    disk = 10_000  # bytes the (simulated) disk holds; the cap is far above it

    class SmallDisk(EvidenceFolder):
        def _write_whole(self, path: Path, data: bytes) -> None:
            used = sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())
            if used + len(data) > disk:
                raise OSError(errno.ENOSPC, "No space left on device")
            super()._write_whole(path, data)

    folder = SmallDisk(tmp_path, 10_000_000)
    for i in range(25):  # 1,000 bytes each: the 11th finds the disk full
        folder.write(tmp_path / "cam" / f"{i:02d}.jpg", bytes(1000))
    kept = sorted(p.name for p in tmp_path.rglob("*.jpg"))
    assert kept[-1] == "24.jpg" and len(kept) >= 8 and kept[0] != "00.jpg", kept  # the newest kept, the oldest gone
    assert folder.bytes == 1000 * len(kept) and not list(tmp_path.rglob("*.part"))
    assert caplog.text.count("is full: removed the 2 oldest files") == 1, caplog.text
    with pytest.raises(OSError, match="No space left"):  # nothing of ours left to remove: the error as before
        SmallDisk(tmp_path / "other", 10_000_000).write(tmp_path / "other" / "big.jpg", bytes(disk + 1))


@pytest.mark.parametrize("name, safe", [("line1-cam3", "line1-cam3"), ("../etc", "_etc"), ("a/b:c", "a_b_c"),
                                        ("..", "_")])
def test_names_become_safe_file_names(name, safe):
    assert safe_name(name) == safe


def test_a_hung_evidence_disk_never_holds_up_closing(tmp_path, caplog):
    """The writer stuck in a write that never returns (a hung network disk) with its queue full: close() gives up
    after its timeout, logging what was not written, instead of waiting for the disk (a drain waited forever)."""
    import dataclasses

    from yolov12_serve.evidence import QUEUE

    disk = threading.Event()

    class HungFolder(EvidenceFolder):
        def write(self, path: Path, data: bytes) -> None:
            disk.wait()  # the disk answers only when the test ends
            super().write(path, data)

    skipped: list = []
    rec = EvidenceRecorder(HungFolder(tmp_path, 10_000_000), lambda sid: Picture(jpeg(), 0),
                           on_skipped=lambda reason, n: skipped.append((reason, n)))
    try:
        for i in range(QUEUE + 2):  # one in the writer's hands, QUEUE waiting, one more turned away
            sid = f"cam{i}"
            rec.objects(sid, [1], [0], NAMES)
            settle(rec, sid)
            rec.result(dataclasses.replace(result(0, [([10, 10, 50, 50, 0.9, 0], 1)]), stream_id=sid))
        assert ("busy", 1) in skipped
        closing = threading.Thread(target=rec.close, kwargs={"timeout": 0.5}, daemon=True)
        started = time.monotonic()
        closing.start()
        closing.join(5)
        assert not closing.is_alive() and time.monotonic() - started < 4  # about its 0.5 s, not the disk's forever
        assert f"the picture it is writing and {QUEUE} queued not written" in caplog.text
    finally:
        disk.set()
