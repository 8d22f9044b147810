"""A camera's detection filters (filters.py): score, classes and zone, as published for AddStream."""

from __future__ import annotations

import math

import numpy as np
import pytest

from yolov12_serve.errors import InvalidArgumentError
from yolov12_serve.filters import DetectionFilter, check_class_scores, check_zone, inside, zone_from_flat

NAMES = {0: "scratch", 1: "dent", 2: "crack"}


def boxes(*rows: tuple[float, float, float, float, float, int]) -> np.ndarray:
    return np.array(rows, np.float32).reshape(-1, 6)


def test_points_inside_a_concave_polygon():
    """An L-shaped zone: its notch is outside, though inside the bounding box (a box test would keep it)."""
    ell = np.array([(0, 0), (1, 0), (1, 0.5), (0.5, 0.5), (0.5, 1), (0, 1)], float)
    points = np.array([(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75), (1.5, 0.25), (-0.1, 0.5)])
    assert inside(points, ell).tolist() == [True, True, True, False, False, False]


def test_a_filter_keeps_score_class_and_zone_together():
    """A 200x100 frame; zone the left half. Each row fails one condition but the kept one."""
    f = DetectionFilter(0.5, ["dent", "crack"], [(0, 0), (0.5, 0), (0.5, 1), (0, 1)])
    det = boxes((10, 10, 30, 30, 0.9, 1),    # dent, left, strong: kept
                (10, 10, 30, 30, 0.4, 1),    # too weak
                (10, 10, 30, 30, 0.9, 0),    # scratch: not a class asked for
                (150, 10, 190, 30, 0.9, 2),  # crack, right half: outside the zone
                (80, 40, 118, 60, 0.8, 2))   # crack whose box reaches the right half, centre (99, 50) inside
    got = f(det, (100, 200), NAMES)
    assert got.tolist() == det[[0, 4]].tolist()
    assert DetectionFilter()(det, (100, 200), NAMES) is det and not DetectionFilter().active


def test_classes_follow_the_model_s_names_after_a_swap():
    """Classes are names: a new model numbering them otherwise is filtered by its own names."""
    f = DetectionFilter(classes=["crack"])
    det = boxes((0, 0, 10, 10, 0.9, 2), (0, 0, 10, 10, 0.9, 0))
    assert f(det, (100, 100), NAMES)[:, 5].tolist() == [2]
    assert f(det, (100, 100), {0: "crack", 1: "dent", 2: "scratch"})[:, 5].tolist() == [0]
    assert len(f(det, (100, 100), {0: "hole"})) == 0  # a model without the class: none of it


def test_a_class_s_own_score_replaces_the_camera_s_for_that_class_only():
    """class_min_scores: dents from 0.3, cracks from 0.8, the rest from min_score 0.5; by name, so a model numbering
    the classes otherwise is filtered by its own names."""
    f = DetectionFilter(0.5, class_scores=check_class_scores({"dent": 0.3, "crack": 0.8}))
    det = boxes((0, 0, 10, 10, 0.35, 1),   # dent above its own 0.3: kept though under 0.5
                (0, 0, 10, 10, 0.25, 1),   # dent under 0.3
                (0, 0, 10, 10, 0.7, 2),    # crack under its own 0.8, though over 0.5
                (0, 0, 10, 10, 0.85, 2),   # crack: kept
                (0, 0, 10, 10, 0.45, 0),   # scratch: the camera's 0.5
                (0, 0, 10, 10, 0.55, 0))   # scratch: kept
    assert f.active and f(det, (100, 100), NAMES).tolist() == det[[0, 3, 5]].tolist()
    renumbered = {0: "crack", 1: "scratch", 2: "dent"}
    kept = f(det, (100, 100), renumbered)[:, 4].tolist()  # 1 = scratch (0.5), 2 = dent (0.3), 0 = crack (0.8)
    assert kept == pytest.approx([0.7, 0.85])
    assert DetectionFilter(class_scores=(("dent", 0.0),)).active  # a class named at 0: still the filter's work
    assert check_class_scores([(" dent ", 0.3), ("dent", 0.4)]) == (("dent", 0.4),)
    for bad, message in [({"": 0.3}, "empty class name"), ({"dent": 1.5}, "must be 0..1"),
                         ({"dent": float("nan")}, "must be 0..1")]:
        with pytest.raises(InvalidArgumentError, match=message):
            check_class_scores(bad)


def test_zones_are_checked_with_the_fix_in_the_message():
    assert check_zone([]) == ()
    assert zone_from_flat([0, 0, 1, 0, 1, 1]) == ((0, 0), (1, 0), (1, 1))
    for bad, message in [([0, 0, 1, 0, 1], "x, y pairs"), ([0, 0, 1, 1], "at least 3 points"),
                         ([0, 0, 1, 0, 1, 1.2], "outside the frame"), ([0, 0, 1, 0, float("nan"), 1], "outside"),
                         ([0, 0, 0.5, 0.5, 1, 1], "encloses no area"),
                         ([0, 0, 1, 1, 1, 0, 0, 1], "edges cross"),  # a symmetric bowtie: its halves cancel
                         ([0.5, 0.5] * 257, "at most 256 points")]:  # each detection is tested against each edge
        with pytest.raises(InvalidArgumentError, match=message):
            zone_from_flat(bad)
    ring = [(0.5 + 0.4 * math.cos(a * math.tau / 256), 0.5 + 0.4 * math.sin(a * math.tau / 256)) for a in range(256)]
    assert len(check_zone(ring)) == 256
