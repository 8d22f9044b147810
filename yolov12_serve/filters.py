"""What of a camera's detections is published: its own score threshold (one for all classes, and one of their own for
some), classes and zone (AddStream's min_score, class_min_scores, classes and zone), applied where results are
published, so the same in one process and with device processes."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .errors import InvalidArgumentError

Point = tuple[float, float]
MAX_ZONE_POINTS = 256


def check_zone(zone: Sequence[Point]) -> tuple[Point, ...]:
    """`zone` as a tuple of (x, y) fractions of the frame, or InvalidArgumentError: empty (the whole frame) or
    3..MAX_ZONE_POINTS points, each coordinate in 0..1."""
    if len(zone) > MAX_ZONE_POINTS:  # every detection is tested against each edge
        raise InvalidArgumentError(f"a zone has at most {MAX_ZONE_POINTS} points, got {len(zone)}: outline the "
                                   "region with fewer corners")
    points = tuple((float(x), float(y)) for x, y in zone)
    if points and len(points) < 3:
        raise InvalidArgumentError(f"a zone is a polygon of at least 3 points (x, y as fractions of the frame's "
                                   f"width and height), got {len(points)}")
    for x, y in points:
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):  # NaN fails this too
            raise InvalidArgumentError(f"zone point ({x:g}, {y:g}) is outside the frame: coordinates are fractions "
                                       "of its width and height, 0..1 (0, 0 the top left corner)")
    if points and zone_area(points) < 1e-6:  # a line or a point: nothing would ever be published
        raise InvalidArgumentError("the zone encloses no area (its points are on one line, or its edges cross and "
                                   "its parts cancel out): give the corners of the region whose detections to "
                                   "publish, in order around it")
    return points


def zone_from_flat(values: Sequence[float]) -> tuple[Point, ...]:
    """A zone from the wire's flat list x0, y0, x1, y1, ...; InvalidArgumentError for an odd count."""
    if len(values) % 2:
        raise InvalidArgumentError(f"zone needs x, y pairs: got {len(values)} numbers")
    return check_zone(list(zip(values[0::2], values[1::2], strict=True)))


def check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    """Class names, stripped and without repeats, or InvalidArgumentError for an empty name."""
    names = tuple(dict.fromkeys(str(c).strip() for c in classes))
    if any(not n for n in names):
        raise InvalidArgumentError("classes holds an empty name: give class names as the model knows them")
    return names


def check_class_scores(scores: Mapping[str, float] | Sequence[tuple[str, float]]) -> tuple[tuple[str, float], ...]:
    """Per-class scores as sorted (name, score) pairs, or InvalidArgumentError: names not empty, scores 0..1."""
    pairs = scores.items() if isinstance(scores, Mapping) else scores
    out: dict[str, float] = {}
    for name, score in pairs:
        name, score = str(name).strip(), float(score)
        if not name:
            raise InvalidArgumentError("class_min_scores holds an empty class name: give class names as the model "
                                       "knows them")
        if not 0.0 <= score <= 1.0:  # NaN fails this too
            raise InvalidArgumentError(f"class_min_scores: the score of {name!r} must be 0..1, got {score:g}")
        out[name] = score
    return tuple(sorted(out.items()))


def inside(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Which of `points` [N, 2] lie inside `polygon` [M, 2] (even-odd rule, by a ray towards +x)."""
    x, y = points[:, :1], points[:, 1:]
    x0, y0 = polygon[:, 0], polygon[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    crosses = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return (crosses & (x < at)).sum(axis=1) % 2 == 1


class DetectionFilter:
    """Keeps the detections a camera publishes: score >= min_score (or the class's own in `class_scores`), class
    among `classes` (names; empty: any), box centre inside `zone` (a polygon in fractions of the frame; empty:
    anywhere)."""

    def __init__(self, min_score: float = 0.0, classes: Sequence[str] = (), zone: Sequence[Point] = (),
                 class_scores: Sequence[tuple[str, float]] = ()) -> None:
        self.min_score, self.classes, self.zone = min_score, tuple(classes), tuple(zone)  # as asked for (shown)
        self.class_scores = tuple(class_scores)
        self._allowed = frozenset(classes)
        self._polygon = np.asarray(zone, np.float64).reshape(-1, 2)
        self._ids: tuple[Mapping[int, str], np.ndarray] | None = None  # (a model's names, the ids they allow)
        self._scores: tuple[Mapping[int, str], list[tuple[int, float]]] | None = None  # (names, (id, score) pairs)

    @property
    def active(self) -> bool:
        """Whether it leaves anything out (else publishing skips it)."""
        return self.min_score > 0 or bool(self.classes) or bool(self.zone) or bool(self.class_scores)

    def __call__(self, detections: np.ndarray, src_hw: tuple[int, int], names: Mapping[int, str]) -> np.ndarray:
        """The rows of `detections` [N, 6] (x1, y1, x2, y2 in source pixels, score, class) this camera publishes."""
        if not len(detections) or not self.active:
            return detections
        keep = np.ones(len(detections), bool)
        if self.class_scores:
            threshold = np.full(len(detections), self.min_score, np.float32)
            for class_id, score in self._class_scores(names):
                threshold[detections[:, 5] == class_id] = score
            keep &= detections[:, 4] >= threshold
        elif self.min_score > 0:
            keep &= detections[:, 4] >= self.min_score
        if self.classes:
            keep &= np.isin(detections[:, 5], self._class_ids(names))
        if self.zone:
            h, w = src_hw
            centres = np.stack([(detections[:, 0] + detections[:, 2]) / (2 * max(w, 1)),
                                (detections[:, 1] + detections[:, 3]) / (2 * max(h, 1))], axis=1)
            keep &= inside(centres, self._polygon)
        return detections[keep]

    def track_start_scores(self, detections: np.ndarray, names: Mapping[int, str],
                           track_min_score: float) -> np.ndarray | None:
        """Each detection's score to start an object on a tracked camera: `track_min_score`, or its class's own
        score where lower (the operator said such a crack counts: it must become an object, not a detection with
        no id). None when no class has a lower one."""
        lower = [(c, s) for c, s in self._class_scores(names) if s < track_min_score] if self.class_scores else []
        if not lower:
            return None
        starts = np.full(len(detections), track_min_score, np.float32)
        for class_id, score in lower:
            starts[detections[:, 5] == class_id] = score
        return starts

    def _class_ids(self, names: Mapping[int, str]) -> np.ndarray:
        """The ids of the model's classes named in `classes` (cached per names mapping: a swap brings a new one)."""
        if self._ids is None or self._ids[0] is not names:
            self._ids = (names, np.array([i for i, n in names.items() if n in self._allowed], np.float32))
        return self._ids[1]

    def _class_scores(self, names: Mapping[int, str]) -> list[tuple[int, float]]:
        """(class id, its score) for the model's classes named in `class_scores` (cached per names mapping)."""
        if self._scores is None or self._scores[0] is not names:
            own = dict(self.class_scores)
            self._scores = (names, [(i, own[n]) for i, n in names.items() if n in own])
        return self._scores[1]


def zone_area(zone: Sequence[Point]) -> float:
    """A polygon's area as a fraction of the frame (shoelace formula)."""
    s = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(zone, [*zone[1:], zone[0]], strict=True))
    return math.fabs(s) / 2
