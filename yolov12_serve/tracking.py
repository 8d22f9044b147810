"""Object tracking on a camera (AddStream `track`): the same part on a belt keeps one id from frame to frame, so
a plant's systems record each object once, not once per frame, and `yolov12_objects_total` counts parts.

Boxes are matched to the camera's tracks by IoU with where each track is predicted to be now (its last box moved
at its measured velocity over the time since: frames dropped under overload only lengthen the step), same class
only, best pairs first; what IoU leaves unmatched is matched by centre distance within one box size (a fast part
or a low frame rate moves further than its own width). A track is confirmed, and gets its id, at its second
match: a one-frame flicker never becomes an object, and only a detection scoring `new_track_score` starts a track
(weaker ones continue one). One not seen for `max_age_s` is forgotten, or, on a camera whose results come further
apart than that (1 fps, a low max_fps), for SLOW_CAMERA_FRAMES of its frame intervals.
"""

from __future__ import annotations

import collections
import statistics

import numpy as np

__all__ = ["MAX_AGE_S", "MIN_IOU", "NEW_TRACK_SCORE", "SLOW_CAMERA_FRAMES", "Tracker"]

MAX_AGE_S = 1.0  # a track not matched for this long is over (a part hidden by an arm for a moment keeps its id)
MIN_IOU = 0.2  # IoU with a track's predicted box that counts as the same object
CONFIRM_HITS = 2  # matches before a track is confirmed (gets an id and is counted)
# A detection scoring less may continue a track but not start one (ByteTrack's rule): a model's weak duplicate and
# flickering boxes would each become an object. The demo model's four cameras, 23 s each: 17, 23, 8 and 16 objects
# counted where 17, 18, 10 and 18 parts passed; without this rule 28, 38, 19 and 43.
NEW_TRACK_SCORE = 0.5
# On a slow camera a track lives this many of its frame intervals (the median of the last few gaps between results,
# so a stall does not stretch it): at 1 fps a part seen in the previous frame is still tracked, one missing from a
# frame is not. At max_age_s alone, each frame 1.002 s after the last would forget every track: nothing counted.
SLOW_CAMERA_FRAMES = 1.5


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a [N, 4] with boxes b [M, 4] (x1, y1, x2, y2): [N, M]."""
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.maximum(w, 0.0) * np.maximum(h, 0.0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def _greedy(score: np.ndarray, at_least: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of `score` paired best first, each row and column used once, each pair scoring >= at_least."""
    rows, cols = np.nonzero(score >= at_least)
    if len(rows) <= 1:
        return rows, cols
    taken_r, taken_c, keep = set(), set(), []
    for i in np.argsort(-score[rows, cols], kind="stable").tolist():  # a few candidates: a plain loop is fastest
        r, c = int(rows[i]), int(cols[i])
        if r not in taken_r and c not in taken_c:
            taken_r.add(r)
            taken_c.add(c)
            keep.append(i)
    return rows[keep], cols[keep]


class Tracker:
    """One camera's tracks. `update(detections, t)` gives each detection its track id (0 while its track is not
    confirmed) and says which classes gained a confirmed object; results must come in frame order. Arrays, one row
    per track (~70 us a frame of 5 parts on the AMD EPYC VM, 2 cores: in the API process, tracked cameras only)."""

    def __init__(self, max_age_s: float = MAX_AGE_S, min_iou: float = MIN_IOU,
                 new_track_score: float = NEW_TRACK_SCORE) -> None:
        self.max_age_s, self.min_iou, self.new_track_score = max_age_s, min_iou, new_track_score
        self._boxes = np.zeros((0, 4))  # each track's last box
        self._velocity = np.zeros((0, 2))  # its centre's pixels per second
        self._classes = np.zeros(0)
        self._seen = np.zeros(0)  # when it was last matched
        self._hits = np.zeros(0, np.int64)
        self._ids = np.zeros(0, np.int64)  # 0 until confirmed
        self.next_id = 1  # the id the next confirmed object gets
        self._last_t: float | None = None  # time of the previous update
        self._src_hw: tuple[int, int] | None = None  # the frame size the tracks' boxes are in pixels of
        self._gaps: collections.deque[float] = collections.deque(maxlen=9)  # the latest times between updates

    def __len__(self) -> int:
        return len(self._ids)

    def update(self, detections: np.ndarray, t: float, src_hw: tuple[int, int] | None = None,
               start_scores: np.ndarray | None = None) -> tuple[np.ndarray, list[int]]:
        """(track id per row of `detections` [N, 6] (x1, y1, x2, y2, score, class) at time `t` in seconds, the class
        of each track confirmed by this frame). `src_hw`: the (h, w) of the frame the boxes are in pixels of.
        `start_scores`: each row's score to start a track, where not `new_track_score` (a class of its own score)."""
        n = len(detections)
        ids = np.zeros(n, np.int64)
        if src_hw is not None:
            self._rescale(src_hw)
        if self._last_t is not None and t > self._last_t:
            self._gaps.append(t - self._last_t)
        self._last_t = t
        if len(self._ids):
            max_age = self.max_age_s
            if self._gaps:
                max_age = max(max_age, SLOW_CAMERA_FRAMES * statistics.median(self._gaps))
            live = t - self._seen <= max_age
            if not live.all():
                self._keep(live)
        if not n:
            return ids, []
        boxes = detections[:, :4].astype(np.float64)
        classes = detections[:, 5].astype(np.float64)
        d, k = self._match(boxes, classes, t)
        confirmed: list[int] = []
        if len(d):
            dt = (t - self._seen[k])[:, None]
            step = (_centre(boxes[d]) - _centre(self._boxes[k])) / np.maximum(dt, 1e-9)
            velocity = np.where(self._hits[k, None] == 1, step, 0.5 * (self._velocity[k] + step))
            self._velocity[k] = np.where(dt > 0, velocity, self._velocity[k])  # two results of one instant: kept
            self._boxes[k], self._seen[k] = boxes[d], t
            self._hits[k] += 1
            new = k[(self._ids[k] == 0) & (self._hits[k] >= CONFIRM_HITS)]
            if len(new):
                self._ids[new] = np.arange(self.next_id, self.next_id + len(new))
                self.next_id += len(new)
                confirmed = self._classes[new].astype(int).tolist()
            ids[d] = self._ids[k]
        start = self.new_track_score if start_scores is None else start_scores
        unmatched = detections[:, 4] >= start  # a weak detection may continue a track, not start one
        unmatched[d] = False
        if unmatched.any():  # a tentative track each
            m = int(unmatched.sum())
            self._boxes = np.concatenate([self._boxes, boxes[unmatched]])
            self._velocity = np.concatenate([self._velocity, np.zeros((m, 2))])
            self._classes = np.concatenate([self._classes, classes[unmatched]])
            self._seen = np.concatenate([self._seen, np.full(m, t)])
            self._hits = np.concatenate([self._hits, np.ones(m, np.int64)])
            self._ids = np.concatenate([self._ids, np.zeros(m, np.int64)])
        return ids, confirmed

    def _match(self, boxes: np.ndarray, classes: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
        """(detections, tracks) paired: by IoU with the predicted boxes, then what is left by centre distance."""
        if not len(self._ids):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        shift = self._velocity * (t - self._seen)[:, None]
        predicted = self._boxes + np.concatenate([shift, shift], axis=1)
        same_class = classes[:, None] == self._classes[None, :]
        d, k = _greedy(np.where(same_class, box_iou(boxes, predicted), -1.0), self.min_iou)
        rows = np.ones(len(boxes), bool)
        rows[d] = False
        cols = np.ones(len(self._ids), bool)
        cols[k] = False
        if not (rows.any() and cols.any() and same_class[np.ix_(rows, cols)].any()):
            return d, k
        r, c = np.flatnonzero(rows), np.flatnonzero(cols)  # centre distance in box sizes: 1 = its larger side away
        gap = np.linalg.norm(_centre(boxes[r])[:, None] - _centre(predicted[c])[None], axis=2)
        size = (boxes[r, 2:] - boxes[r, :2]).max(axis=1)[:, None]
        closeness = np.where(same_class[np.ix_(r, c)], 1.0 - gap / np.maximum(size, 1.0), -1.0)
        d2, k2 = _greedy(closeness, 0.0)
        return np.concatenate([d, r[d2]]), np.concatenate([k, c[k2]])

    def _rescale(self, src_hw: tuple[int, int]) -> None:
        """The camera's frames changed size (its resolution set anew, on the same or a new connection): its tracks'
        boxes and speeds are scaled to the new pixels, the same view assumed, so parts in sight keep their ids
        rather than being counted again (or a part's old box, in the old pixels, matching another part)."""
        new = (int(src_hw[0]), int(src_hw[1]))
        if not all(new):  # a size not known: the tracks stay in the pixels they are in
            return
        old, self._src_hw = self._src_hw, new
        if old is None or old == new:
            return
        sy, sx = self._src_hw[0] / old[0], self._src_hw[1] / old[1]
        self._boxes = self._boxes * np.array([sx, sy, sx, sy])
        self._velocity = self._velocity * np.array([sx, sy])

    def _keep(self, which: np.ndarray) -> None:
        self._boxes, self._velocity = self._boxes[which], self._velocity[which]
        self._classes, self._seen = self._classes[which], self._seen[which]
        self._hits, self._ids = self._hits[which], self._ids[which]


def _centre(boxes: np.ndarray) -> np.ndarray:
    return (boxes[..., :2] + boxes[..., 2:]) / 2
