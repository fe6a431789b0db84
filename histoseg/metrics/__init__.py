"""Evaluation metrics (layer 1): Dice, AJI, AJI+, PQ on instance maps; point-detection F1.

Definitions: ``docs/metrics.md``. Importing this package has no side effects.
"""

from __future__ import annotations

from histoseg.metrics.classification import (
    ClassCounts,
    ClassificationResult,
    ClassificationTally,
    classification_f1,
)
from histoseg.metrics.detection import (
    DetectionTally,
    PointMatch,
    centroids,
    detection_counts,
    detection_f1,
    f1_from_counts,
    match_points,
)
from histoseg.metrics.instance import (
    OverlapTable,
    PQResult,
    aji,
    aji_plus,
    as_label_map,
    dice,
    panoptic_quality,
    relabel,
)
from histoseg.metrics.summary import DETECTION_KEYS, SEGMENTATION_KEYS, evaluate_instances, mean_over_images

__all__ = [
    "DETECTION_KEYS",
    "SEGMENTATION_KEYS",
    "ClassCounts",
    "ClassificationResult",
    "ClassificationTally",
    "DetectionTally",
    "OverlapTable",
    "PQResult",
    "PointMatch",
    "aji",
    "aji_plus",
    "as_label_map",
    "centroids",
    "classification_f1",
    "detection_counts",
    "detection_f1",
    "dice",
    "evaluate_instances",
    "f1_from_counts",
    "match_points",
    "mean_over_images",
    "panoptic_quality",
    "relabel",
]
