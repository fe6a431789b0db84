"""Instance-segmentation metrics on label maps: Dice, AJI, AJI+, panoptic quality.

Definitions follow ``docs/metrics.md`` (HoVer-Net's ``compute_stats``). Inputs are 2-D instance maps of
the same shape: 0 is background, every other value one nucleus; ids need not be contiguous (maps are
relabelled first). Integer, boolean and integral-valued float maps are accepted.

Conventions for empty cases: when both maps have no instance, Dice, AJI, AJI+ and DQ/SQ/PQ are 1.0;
when exactly one is empty they are 0.0. SQ is 0.0 whenever there is no true positive (and the maps are
not both empty).

Tie-breaks: in AJI a ground truth with several predictions of exactly equal IoU takes the one with the
smallest label id. AJI+ uses a maximum-total-IoU one-to-one matching; when several matchings reach the
same total, which one is used is unspecified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from histoseg.errors import ConfigError, DatasetError
from histoseg.metrics._matching import match_edges

__all__ = [
    "OverlapTable",
    "PQResult",
    "aji",
    "aji_plus",
    "as_label_map",
    "dice",
    "panoptic_quality",
    "relabel",
]


class PQResult(NamedTuple):
    """Panoptic quality of one image: ``pq = dq * sq``."""

    dq: float
    sq: float
    pq: float
    tp: int
    fp: int
    fn: int


def as_label_map(inst: ArrayLike, name: str = "instance map") -> np.ndarray:
    """Validate a 2-D instance map and return it as a non-negative integer array (no copy if possible).

    Raises :class:`DatasetError` for a wrong dimensionality, negative labels or non-integral values.
    """
    a = np.asarray(inst)
    if a.ndim != 2:
        raise DatasetError(f"{name} must be 2-D, got shape {a.shape}")
    if a.dtype == np.bool_:
        return a.astype(np.uint8)
    if a.dtype.kind == "f":
        if a.size and not (np.isfinite(a).all() and (a == np.round(a)).all()):
            raise DatasetError(f"{name} has non-integral or non-finite labels")
        a = a.astype(np.int64)
    elif a.dtype.kind not in "iu":
        raise DatasetError(f"{name} must hold integer labels, got dtype {a.dtype}")
    if a.dtype.kind == "i" and a.size and a.min() < 0:
        raise DatasetError(f"{name} has negative labels")
    return a


def _relabel(a: np.ndarray) -> tuple[np.ndarray, int]:
    """Contiguous relabelling of a validated map; returns ``(labels, n_instances)``."""
    if a.size == 0:
        return np.zeros(a.shape, np.int32), 0
    top = int(a.max())
    if top == 0:
        return np.zeros(a.shape, np.int32), 0
    if top <= 4 * a.size + (1 << 16):
        present = np.zeros(top + 1, bool)
        present[a.ravel()] = True
        present[0] = False
        lut = np.cumsum(present)
        n = int(lut[-1])
        out = lut[a]
    else:
        uniq, inverse = np.unique(a.ravel(), return_inverse=True)
        has_bg = uniq[0] == 0
        n = int(uniq.size - has_bg)
        out = (inverse if has_bg else inverse + 1).reshape(a.shape)
    return out.astype(np.int32 if n < 2**31 - 1 else np.int64), n


def relabel(inst: ArrayLike) -> np.ndarray:
    """Relabel an instance map to ids ``1..N`` (0 stays background), keeping the order of the old ids."""
    return _relabel(as_label_map(inst))[0]


@dataclass(frozen=True)
class OverlapTable:
    """Areas and pairwise intersections of two instance maps, over overlapping pairs only.

    Instances are indexed from 0 in the order of their (relabelled) ids. ``true_idx[k]``,
    ``pred_idx[k]`` and ``inter[k]`` describe the k-th overlapping pair; every pair with a non-empty
    intersection is listed exactly once.
    """

    true_areas: np.ndarray  # (n_true,) int64
    pred_areas: np.ndarray  # (n_pred,) int64
    true_idx: np.ndarray  # (K,) int64
    pred_idx: np.ndarray  # (K,) int64
    inter: np.ndarray  # (K,) int64

    @classmethod
    def from_maps(cls, true: ArrayLike, pred: ArrayLike) -> OverlapTable:
        """Build the table from two instance maps of the same shape (:class:`DatasetError` otherwise)."""
        t_raw = as_label_map(true, "ground-truth map")
        p_raw = as_label_map(pred, "prediction map")
        if t_raw.shape != p_raw.shape:
            raise DatasetError(f"ground truth {t_raw.shape} and prediction {p_raw.shape} differ in shape")
        t_map, n_t = _relabel(t_raw)
        p_map, n_p = _relabel(p_raw)
        t = t_map.ravel()
        p = p_map.ravel()
        true_areas = np.bincount(t, minlength=n_t + 1)[1:].astype(np.int64)
        pred_areas = np.bincount(p, minlength=n_p + 1)[1:].astype(np.int64)
        both = (t > 0) & (p > 0)
        stride = n_p + 1
        key = t[both].astype(np.int64) * stride + p[both]
        if (n_t + 1) * stride <= max(4 * t.size, 1 << 20):
            counts = np.bincount(key, minlength=0)
            uniq = np.flatnonzero(counts)
            inter = counts[uniq]
        else:
            uniq, inter = np.unique(key, return_counts=True)
        return cls(
            true_areas=true_areas,
            pred_areas=pred_areas,
            true_idx=(uniq // stride - 1).astype(np.int64),
            pred_idx=(uniq % stride - 1).astype(np.int64),
            inter=inter.astype(np.int64),
        )

    @property
    def n_true(self) -> int:
        return int(self.true_areas.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_areas.size)

    @property
    def unions(self) -> np.ndarray:
        """Union area of each listed pair."""
        unions: np.ndarray = self.true_areas[self.true_idx] + self.pred_areas[self.pred_idx] - self.inter
        return unions

    @property
    def iou(self) -> np.ndarray:
        """IoU of each listed pair (all > 0)."""
        iou: np.ndarray = self.inter / self.unions
        return iou

    def dice(self) -> float:
        """Binary Dice ``2|T ∩ P| / (|T| + |P|)``."""
        total = int(self.true_areas.sum() + self.pred_areas.sum())
        if total == 0:
            return 1.0
        return 2.0 * float(self.inter.sum()) / total

    def _aji_from_pairs(self, sel: np.ndarray) -> float:
        """AJI sums ``C / U`` over the selected pairs (indices into the pair table)."""
        if self.n_true == 0 and self.n_pred == 0:
            return 1.0
        ti, pi = self.true_idx[sel], self.pred_idx[sel]
        paired = np.zeros(self.n_true, bool)
        paired[ti] = True
        taken = np.zeros(self.n_pred, bool)
        taken[pi] = True
        c = int(self.inter[sel].sum())
        u = int(self.unions[sel].sum() + self.true_areas[~paired].sum() + self.pred_areas[~taken].sum())
        return c / u

    def aji(self) -> float:
        """Aggregated Jaccard Index, MoNuSeg definition (a prediction may serve several ground truths)."""
        k = self.true_idx.size
        if k == 0:
            return self._aji_from_pairs(np.zeros(0, np.int64))
        # Per ground truth: highest IoU first, then smallest prediction id; keep the first row of each.
        order = np.lexsort((self.pred_idx, -self.iou, self.true_idx))
        t_sorted = self.true_idx[order]
        first = np.ones(k, bool)
        first[1:] = t_sorted[1:] != t_sorted[:-1]
        return self._aji_from_pairs(order[first])

    def aji_plus(self) -> float:
        """AJI+: the AJI sums over a one-to-one matching of maximum total IoU."""
        sel = self._matched_pairs(np.arange(self.true_idx.size), cardinality_first=False)
        return self._aji_from_pairs(sel)

    def _matched_pairs(self, candidates: np.ndarray, *, cardinality_first: bool) -> np.ndarray:
        """Indices into the pair table of an optimal one-to-one matching among ``candidates``."""
        picked = match_edges(
            self.true_idx[candidates],
            self.pred_idx[candidates],
            -self.iou[candidates],
            self.n_true,
            self.n_pred,
            cardinality_first=cardinality_first,
        )
        chosen: np.ndarray = candidates[picked]
        return chosen

    def panoptic_quality(self, iou_threshold: float = 0.5) -> PQResult:
        """Panoptic quality; a pair matches when ``IoU > iou_threshold`` (strict).

        For thresholds >= 0.5 such matches are unique. Below 0.5 a one-to-one matching is chosen that
        first maximises the number of matches, then their total IoU.
        """
        thr = float(iou_threshold)
        if not 0.0 <= thr < 1.0:
            raise ConfigError(f"iou_threshold must be in [0, 1), got {iou_threshold}")
        if self.n_true == 0 and self.n_pred == 0:
            return PQResult(1.0, 1.0, 1.0, 0, 0, 0)
        iou = self.iou
        candidates = np.flatnonzero(iou > thr)
        if thr < 0.5:
            candidates = self._matched_pairs(candidates, cardinality_first=True)
        tp = int(candidates.size)
        fp = self.n_pred - tp
        fn = self.n_true - tp
        dq = tp / (tp + 0.5 * fp + 0.5 * fn)
        sq = float(iou[candidates].mean()) if tp else 0.0
        return PQResult(dq, sq, dq * sq, tp, fp, fn)


def dice(true: ArrayLike, pred: ArrayLike) -> float:
    """Binary Dice of two instance maps (both empty: 1.0)."""
    return OverlapTable.from_maps(true, pred).dice()


def aji(true: ArrayLike, pred: ArrayLike) -> float:
    """Aggregated Jaccard Index (MoNuSeg definition; both empty: 1.0)."""
    return OverlapTable.from_maps(true, pred).aji()


def aji_plus(true: ArrayLike, pred: ArrayLike) -> float:
    """AJI+ with a one-to-one maximum-IoU (Hungarian) matching (both empty: 1.0)."""
    return OverlapTable.from_maps(true, pred).aji_plus()


def panoptic_quality(true: ArrayLike, pred: ArrayLike, iou_threshold: float = 0.5) -> PQResult:
    """Detection quality, segmentation quality and PQ at ``IoU > iou_threshold`` (both empty: all 1.0)."""
    return OverlapTable.from_maps(true, pred).panoptic_quality(iou_threshold)
