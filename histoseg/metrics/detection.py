"""Point-detection metrics: centroids matched one-to-one within a radius, F1 pooled over images.

Points are ``(N, 2)`` arrays of ``(x, y)`` in pixels. A true and a predicted point may be matched when
their Euclidean distance is <= ``radius`` (inclusive). The matching maximises the number of matched
pairs, then minimises their total distance (Hungarian algorithm per connected group of candidates).

Empty conventions: with no true and no predicted points, precision, recall and F1 are 1.0; when only
one side is empty they are 0.0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy.spatial import cKDTree

from histoseg.errors import ConfigError, DatasetError
from histoseg.metrics._matching import match_edges
from histoseg.metrics.instance import _relabel, as_label_map

__all__ = [
    "DetectionTally",
    "PointMatch",
    "centroids",
    "detection_counts",
    "detection_f1",
    "f1_from_counts",
    "match_points",
]


class PointMatch(NamedTuple):
    """Result of :func:`match_points`: ``pairs`` is (K, 2) int64 ``(true_index, pred_index)`` rows."""

    pairs: np.ndarray
    tp: int
    fp: int
    fn: int


def _as_points(xy: ArrayLike, name: str) -> np.ndarray:
    a = np.asarray(xy, dtype=np.float64)
    if a.size == 0:
        return np.zeros((0, 2), np.float64)
    if a.ndim != 2 or a.shape[1] != 2:
        raise DatasetError(f"{name} must be an (N, 2) array of (x, y), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise DatasetError(f"{name} has non-finite coordinates")
    return a


def _check_radius(radius: float) -> float:
    r = float(radius)
    if not (math.isfinite(r) and r > 0):
        raise ConfigError(f"matching radius must be a positive number, got {radius}")
    return r


def match_points(true_xy: ArrayLike, pred_xy: ArrayLike, radius: float) -> PointMatch:
    """Match true and predicted points one-to-one within ``radius`` (maximum matches, then minimum
    total distance). Pairs are sorted by true index."""
    r = _check_radius(radius)
    t = _as_points(true_xy, "true points")
    p = _as_points(pred_xy, "predicted points")
    pairs = np.zeros((0, 2), np.int64)
    if len(t) and len(p):
        # Candidate search with a slightly padded radius, then the exact inclusive test.
        cand = cKDTree(t).sparse_distance_matrix(cKDTree(p), r * (1 + 1e-9), output_type="ndarray")
        ti = cand["i"].astype(np.int64)
        pi = cand["j"].astype(np.int64)
        d = np.hypot(t[ti, 0] - p[pi, 0], t[ti, 1] - p[pi, 1])
        ok = d <= r
        ti, pi, d = ti[ok], pi[ok], d[ok]
        picked = match_edges(ti, pi, d, len(t), len(p), cardinality_first=True)
        pairs = np.stack([ti[picked], pi[picked]], axis=1)
    tp = int(len(pairs))
    return PointMatch(pairs, tp, len(p) - tp, len(t) - tp)


def detection_counts(true_xy: ArrayLike, pred_xy: ArrayLike, radius: float) -> tuple[int, int, int]:
    """``(tp, fp, fn)`` of one image."""
    m = match_points(true_xy, pred_xy, radius)
    return m.tp, m.fp, m.fn


def f1_from_counts(tp: int, fp: int, fn: int) -> float:
    """``2TP / (2TP + FP + FN)``; 1.0 when all counts are zero."""
    den = 2 * tp + fp + fn
    return 1.0 if den == 0 else 2 * tp / den


@dataclass
class DetectionTally:
    """Detection counts pooled over images; ``add`` one image at a time."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, true_xy: ArrayLike, pred_xy: ArrayLike, radius: float) -> PointMatch:
        """Match one image's points, add its counts, and return its match."""
        m = match_points(true_xy, pred_xy, radius)
        self.add_counts(m.tp, m.fp, m.fn)
        return m

    def add_counts(self, tp: int, fp: int, fn: int) -> None:
        """Add counts computed elsewhere (e.g. per-image rows of :func:`evaluate_instances`)."""
        if min(tp, fp, fn) < 0:
            raise DatasetError(f"detection counts must be >= 0, got tp={tp} fp={fp} fn={fn}")
        self.tp += int(tp)
        self.fp += int(fp)
        self.fn += int(fn)

    @property
    def precision(self) -> float:
        """``TP / (TP + FP)``; with no prediction: 1.0 if nothing was missed, else 0.0."""
        den = self.tp + self.fp
        return self.tp / den if den else float(self.fn == 0)

    @property
    def recall(self) -> float:
        """``TP / (TP + FN)``; with no ground truth: 1.0 if nothing was predicted, else 0.0."""
        den = self.tp + self.fn
        return self.tp / den if den else float(self.fp == 0)

    @property
    def f1(self) -> float:
        """Pooled ``2TP / (2TP + FP + FN)``."""
        return f1_from_counts(self.tp, self.fp, self.fn)


def detection_f1(images: Iterable[tuple[ArrayLike, ArrayLike]], radius: float) -> float:
    """F1 with counts pooled over ``(true_xy, pred_xy)`` pairs, one per image."""
    tally = DetectionTally()
    for true_xy, pred_xy in images:
        tally.add(true_xy, pred_xy, radius)
    return tally.f1


def centroids(inst: ArrayLike) -> np.ndarray:
    """``(N, 2)`` float64 ``(x, y)`` centroids of an instance map, in the order of the label ids.

    ``x`` is the mean column index and ``y`` the mean row index of the nucleus pixels (pixel centres at
    integer coordinates, as scikit-image's ``regionprops``).
    """
    lab, n = _relabel(as_label_map(inst))
    if n == 0:
        return np.zeros((0, 2), np.float64)
    flat = lab.ravel()
    rows, cols = np.indices(lab.shape)
    area = np.bincount(flat, minlength=n + 1)[1:]
    sx = np.bincount(flat, weights=cols.ravel(), minlength=n + 1)[1:]
    sy = np.bincount(flat, weights=rows.ravel(), minlength=n + 1)[1:]
    return np.stack([sx / area, sy / area], axis=1)
