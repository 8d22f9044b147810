"""Object tracking on a camera (AddStream `track`): the same part on a belt keeps one id from frame to frame, so
a plant's systems record each object once, not once per frame, and `yolov12_objects_total` counts parts.

Boxes are matched to the camera's tracks by IoU with where each track is predicted to be now (its last box moved
at its measured velocity over the time since: frames dropped under overload only lengthen the step), same class
only, best pairs first; what IoU leaves unmatched is matched by centre distance within one box size (a fast part
or a low frame rate moves further than its own width). A track is confirmed, and gets its id, at its second
match: a one-frame flicker never becomes an object. One not seen for `max_age_s` is forgotten.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_AGE_S", "MIN_IOU", "Tracker"]

MAX_AGE_S = 1.0  # a track not matched for this long is over (a part hidden by an arm for a moment keeps its id)
MIN_IOU = 0.2  # IoU with a track's predicted box that counts as the same object
CONFIRM_HITS = 2  # matches before a track is confirmed (gets an id and is counted)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a [N, 4] with boxes b [M, 4] (x1, y1, x2, y2): [N, M]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def _greedy(score: np.ndarray, at_least: float) -> list[tuple[int, int]]:
    """Pairs (row, column) of `score`, highest first, each row and column used once, each scoring >= at_least."""
    pairs = []
    score = score.copy()
    while score.size:
        r, c = np.unravel_index(int(np.argmax(score)), score.shape)
        if score[r, c] < at_least:
            break
        pairs.append((int(r), int(c)))
        score[r, :] = -np.inf
        score[:, c] = -np.inf
    return pairs


class Tracker:
    """One camera's tracks. `update(detections, t)` gives each detection its track id (0 while its track is not
    confirmed) and says which classes gained a confirmed object; results must come in frame order."""

    def __init__(self, max_age_s: float = MAX_AGE_S, min_iou: float = MIN_IOU) -> None:
        self.max_age_s, self.min_iou = max_age_s, min_iou
        self._boxes = np.zeros((0, 4))  # each track's last box
        self._velocity = np.zeros((0, 2))  # its centre's pixels per second
        self._classes = np.zeros(0)
        self._seen = np.zeros(0)  # when it was last matched
        self._hits = np.zeros(0, np.int64)
        self._ids = np.zeros(0, np.int64)  # 0 until confirmed
        self._next_id = 1

    def __len__(self) -> int:
        return len(self._ids)

    def update(self, detections: np.ndarray, t: float) -> tuple[np.ndarray, list[int]]:
        """(track id per row of `detections` [N, 6] (x1, y1, x2, y2, score, class) at time `t` in seconds, the class
        of each track confirmed by this frame)."""
        live = t - self._seen <= self.max_age_s
        if not live.all():
            self._keep(live)
        boxes = detections[:, :4].astype(np.float64)
        classes = detections[:, 5]
        matched = self._match(boxes, classes, t)
        ids = np.zeros(len(detections), np.int64)
        confirmed: list[int] = []
        for d, k in matched:
            dt = t - self._seen[k]
            if dt > 0:
                step = (_centre(boxes[d]) - _centre(self._boxes[k])) / dt
                self._velocity[k] = step if self._hits[k] == 1 else 0.5 * (self._velocity[k] + step)
            self._boxes[k], self._seen[k] = boxes[d], t
            self._hits[k] += 1
            if self._ids[k] == 0 and self._hits[k] >= CONFIRM_HITS:
                self._ids[k] = self._next_id
                self._next_id += 1
                confirmed.append(int(classes[d]))
            ids[d] = self._ids[k]
        new = np.setdiff1d(np.arange(len(detections)), [d for d, _ in matched])
        if len(new):  # unmatched: a tentative track each
            self._boxes = np.concatenate([self._boxes, boxes[new]])
            self._velocity = np.concatenate([self._velocity, np.zeros((len(new), 2))])
            self._classes = np.concatenate([self._classes, classes[new]])
            self._seen = np.concatenate([self._seen, np.full(len(new), t)])
            self._hits = np.concatenate([self._hits, np.ones(len(new), np.int64)])
            self._ids = np.concatenate([self._ids, np.zeros(len(new), np.int64)])
        return ids, confirmed

    def _match(self, boxes: np.ndarray, classes: np.ndarray, t: float) -> list[tuple[int, int]]:
        """(detection, track) pairs: by IoU with the predicted boxes, then what is left by centre distance."""
        if not len(boxes) or not len(self._ids):
            return []
        shift = self._velocity * (t - self._seen)[:, None]
        predicted = self._boxes + np.concatenate([shift, shift], axis=1)
        same_class = classes[:, None] == self._classes[None, :]
        pairs = _greedy(np.where(same_class, box_iou(boxes, predicted), -np.inf), self.min_iou)
        rows = np.setdiff1d(np.arange(len(boxes)), [d for d, _ in pairs])
        cols = np.setdiff1d(np.arange(len(self._ids)), [k for _, k in pairs])
        if len(rows) and len(cols):  # centre distance in box sizes: 1 = one box's larger side away
            gap = np.linalg.norm(_centre(boxes[rows])[:, None] - _centre(predicted[cols])[None], axis=2)
            size = (boxes[rows, 2:] - boxes[rows, :2]).max(axis=1)[:, None]
            closeness = np.where(same_class[np.ix_(rows, cols)], 1.0 - gap / np.maximum(size, 1.0), -np.inf)
            pairs += [(int(rows[r]), int(cols[c])) for r, c in _greedy(closeness, 0.0)]
        return pairs

    def _keep(self, which: np.ndarray) -> None:
        self._boxes, self._velocity = self._boxes[which], self._velocity[which]
        self._classes, self._seen = self._classes[which], self._seen[which]
        self._hits, self._ids = self._hits[which], self._ids[which]


def _centre(boxes: np.ndarray) -> np.ndarray:
    return (boxes[..., :2] + boxes[..., 2:]) / 2
