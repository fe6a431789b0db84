"""CRCHisto reader: nucleus centre points (MATLAB ``.mat``) with their four classes matched one-to-one."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import scipy.io
from scipy.optimize import linear_sum_assignment

from histoseg.datasets.common import Sample, clip_points, dataset_root, read_rgb, require_dir, rescale
from histoseg.errors import DatasetError

CRCHISTO_MPP = 0.55
CRCHISTO_CLASSES = ("epithelial", "fibroblast", "inflammatory", "others")
"""CRCHisto class files in label order: epithelial=1, fibroblast=2, inflammatory=3, others=4 (0: no class)."""

CRCHISTO_MATCH_RADIUS = 10.0
"""Largest distance (native px, ~5.5 µm, about one nucleus radius) at which a class point that is not an
exact copy of a detection point is still taken as the same nucleus."""


def _load_mat_points(path: Path) -> np.ndarray:
    """(N, 2) float64 points of a CRCHisto ``.mat`` file (key ``detection``), as stored (1-based)."""
    if not path.is_file():
        raise DatasetError(f"CRCHisto annotation missing: {path}")
    mat = scipy.io.loadmat(str(path))
    if "detection" not in mat:
        raise DatasetError(f"{path}: no 'detection' array")
    return np.asarray(mat["detection"], dtype=np.float64).reshape(-1, 2)


def _crchisto_points(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Detection points with classes: exact duplicates dropped, class points matched one-to-one."""
    det = _load_mat_points(folder / f"{name}_detection.mat")
    _, first = np.unique(det, axis=0, return_index=True)
    det = det[np.sort(first)]
    cls_pts = [_load_mat_points(folder / f"{name}_{c}.mat") for c in CRCHISTO_CLASSES]
    cls = np.concatenate(cls_pts)
    cls_label = np.concatenate([np.full(len(p), i + 1, dtype=np.int64) for i, p in enumerate(cls_pts)])
    _, first = np.unique(cls, axis=0, return_index=True)  # same spot in two files: first class wins
    keep = np.sort(first)
    cls, cls_label = cls[keep], cls_label[keep]
    classes = np.zeros(len(det), dtype=np.int64)
    matched = np.zeros(len(cls), dtype=bool)
    if len(cls) and len(det):
        dist = np.hypot(cls[:, None, 0] - det[None, :, 0], cls[:, None, 1] - det[None, :, 1])
        # Minimum total distance; pairs farther than the radius are forbidden by a huge cost.
        cost = np.where(dist <= CRCHISTO_MATCH_RADIUS, dist, 1e6)
        rows, cols = linear_sum_assignment(cost)
        ok = dist[rows, cols] <= CRCHISTO_MATCH_RADIUS
        classes[cols[ok]] = cls_label[rows[ok]]
        matched[rows[ok]] = True
    points = np.concatenate([det, cls[~matched]])
    classes = np.concatenate([classes, cls_label[~matched]])
    return points, classes


def load_crchisto(
    split: Literal["train", "validation"],
    target_mpp: float | None,
    root: Path | str | None = None,
    classified_only: bool = False,
) -> list[Sample]:
    """Load CRCHisto ``train`` (70) or ``validation`` (10) 500x500 images with nucleus centre points.

    Points are ``imgN_detection.mat`` (``x`` then ``y``, MATLAB 1-based: 1 is subtracted, then clipped
    into the image; the stored values span 0.15-500.0, and haematoxylin blob centres lie 0.5-0.9 px up and
    left of the raw values, which rules out 0-based). Exact duplicate points are dropped (a class point
    listed twice keeps its first class in file order). Class points
    (epithelial=1, fibroblast=2, inflammatory=3, others=4) are matched one-to-one to detection points
    (optimal assignment, at most ``CRCHISTO_MATCH_RADIUS`` px; nearly all are exact copies); detections with
    no class point get class 0, class points with no detection are appended. ``classified_only=True``
    keeps only points with a class (1..4). Native pixel size ``CRCHISTO_MPP`` (20x, 0.55 µm/px).
    """
    if split not in ("train", "validation"):
        raise DatasetError(f"unknown CRCHisto split {split!r}; use 'train' or 'validation'")
    base = require_dir(dataset_root(root, "crchisto") / split)
    dirs = sorted(p for p in base.iterdir() if p.is_dir())
    if not dirs:
        raise DatasetError(f"no CRCHisto images in {base}")
    out = []
    for d in dirs:
        image = read_rgb(d / f"{d.name}.png")
        points, classes = _crchisto_points(d, d.name)
        points = clip_points(points - 1.0, image.shape)
        if classified_only:
            keep = classes > 0
            points, classes = points[keep], classes[keep]
        sample = Sample(
            name=d.name,
            image=image,
            points=points,
            point_classes=classes,
            mpp=CRCHISTO_MPP,
            source="crchisto",
        )
        out.append(rescale(sample, target_mpp))
    return out
