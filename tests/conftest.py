"""Shared fixtures. ultralytics is a test-only oracle: configured offline, in a temp settings dir."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

_YOLO_DIR = Path(tempfile.gettempdir()) / "yolov12-serve-tests-ultralytics"


def _configure_ultralytics() -> None:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(_YOLO_DIR))
    font = _YOLO_DIR / "Ultralytics" / "Arial.ttf"
    if not font.exists():
        try:
            import matplotlib

            src = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
            font.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, font)
        except Exception:  # matplotlib missing: ultralytics only needs the font for plots
            pass


_configure_ultralytics()
# servers the tests start keep their stream set here unless told otherwise, never in the user's state folder
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="yolov12-serve-tests-state-")


@pytest.fixture(scope="session")
def ultralytics():
    """The ultralytics package as an oracle, or a skip with the reason.

    Importing it monkey-patches PIL.Image.open and cv2.imread/imwrite/imshow process-wide; the
    originals are put back so that tests after an oracle test see the libraries as users do.
    """
    import cv2
    from PIL import Image

    saved = (Image.open, cv2.imread, cv2.imwrite, cv2.imshow)
    module = pytest.importorskip("ultralytics", reason="ultralytics (test-only oracle) is not installed")
    import ultralytics.utils.patches  # noqa: F401 - the module that patches

    Image.open, cv2.imread, cv2.imwrite, cv2.imshow = saved
    return module


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past `limit` bytes fail with EFBIG, as on a disk that fills (SIGXFSZ ignored: the write returns the
    error instead of killing the process); the limit is lifted on exit."""
    old_signal = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_signal)


def no_augment() -> dict[str, float]:
    """Training options for no augmentation at all: every rank and every run sees the same pixels per image."""
    return {"mosaic": 0.0, "mixup": 0.0, "copy_paste": 0.0, "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0,
            "fliplr": 0.0, "translate": 0.0, "scale": 0.0}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 20-image synthetic defect dataset at 96 px (16 train, 4 val), for training tests."""
    from trainer.data import synthesize

    return synthesize(tmp_path_factory.mktemp("tiny"), images=20, imgsz=96, val_fraction=0.2, seed=3)


@pytest.fixture(scope="session")
def mixed_aspect_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 val images (6 train) at 96 px wide, square, 4:3 and 16:9: rect batches of 4, 8 or 16 of them are padded to
    different shapes, so a validation whose batch size changed would score the same weights differently."""
    from trainer.data import synthesize

    return synthesize(tmp_path_factory.mktemp("aspect"), images=30, imgsz=96, val_fraction=0.8, seed=4)


def _hypothesis_profiles() -> None:
    """Property-based tests (tests/test_fuzz.py) run a bounded number of examples by default ('ci', within a couple
    of minutes); `pytest --hypothesis-profile long` is the longer run."""
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # the test extra not installed: those tests skip themselves
        return
    common = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                          HealthCheck.data_too_large]}
    settings.register_profile("ci", max_examples=60, **common)
    settings.register_profile("long", max_examples=1500, **common)
    settings.load_profile("ci")


_hypothesis_profiles()
