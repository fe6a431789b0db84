"""Per-image evaluation of an instance map against ground truth, and the average over images."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from numpy.typing import ArrayLike

from histoseg.errors import ConfigError, DatasetError
from histoseg.metrics.detection import DetectionTally, centroids, match_points
from histoseg.metrics.instance import OverlapTable

__all__ = ["DETECTION_KEYS", "SEGMENTATION_KEYS", "evaluate_instances", "mean_over_images"]

SEGMENTATION_KEYS: tuple[str, ...] = ("dice", "aji", "aji_plus", "dq", "sq", "pq")
"""Per-image metrics that :func:`mean_over_images` averages over images."""

DETECTION_KEYS: tuple[str, ...] = ("det_tp", "det_fp", "det_fn")
"""Per-image detection counts that :func:`mean_over_images` sums before computing F1."""


def evaluate_instances(true: ArrayLike, pred: ArrayLike, mpp: float, radius_um: float) -> dict[str, float]:
    """All per-image metrics of ``pred`` against ``true`` (2-D instance maps of the same shape).

    ``mpp`` is the maps' microns per pixel; centroids are matched within ``radius_um / mpp`` pixels
    (e.g. HoVer-Net's 12 px at 40x, 0.25 µm/px, is 3 µm). Returns the keys of
    :data:`SEGMENTATION_KEYS` (PQ at IoU > 0.5) and the detection counts of :data:`DETECTION_KEYS`.
    """
    m, r = float(mpp), float(radius_um)
    if not (math.isfinite(m) and m > 0):
        raise ConfigError(f"mpp must be a positive number, got {mpp}")
    if not (math.isfinite(r) and r > 0):
        raise ConfigError(f"radius_um must be a positive number, got {radius_um}")
    table = OverlapTable.from_maps(true, pred)
    pq = table.panoptic_quality(0.5)
    det = match_points(centroids(true), centroids(pred), r / m)
    return {
        "dice": table.dice(),
        "aji": table.aji(),
        "aji_plus": table.aji_plus(),
        "dq": pq.dq,
        "sq": pq.sq,
        "pq": pq.pq,
        "det_tp": float(det.tp),
        "det_fp": float(det.fp),
        "det_fn": float(det.fn),
    }


def mean_over_images(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Average rows of :func:`evaluate_instances`: segmentation metrics are means of the per-image
    values; detection counts are summed and ``det_precision``, ``det_recall``, ``det_f1`` computed from
    the pooled counts. Also returns ``n_images``. Raises :class:`DatasetError` for no rows."""
    rows = list(rows)
    if not rows:
        raise DatasetError("no images to average")
    for i, row in enumerate(rows):
        missing = [k for k in (*SEGMENTATION_KEYS, *DETECTION_KEYS) if k not in row]
        if missing:
            raise DatasetError(f"metrics row {i} lacks {', '.join(missing)}")
    out = {k: math.fsum(float(row[k]) for row in rows) / len(rows) for k in SEGMENTATION_KEYS}
    tally = DetectionTally()
    for row in rows:
        tally.add_counts(int(row["det_tp"]), int(row["det_fp"]), int(row["det_fn"]))
    out.update(
        det_tp=float(tally.tp),
        det_fp=float(tally.fp),
        det_fn=float(tally.fn),
        det_precision=tally.precision,
        det_recall=tally.recall,
        det_f1=tally.f1,
        n_images=float(len(rows)),
    )
    return out
