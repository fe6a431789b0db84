"""From a label image to measured nuclei: centroids, type vote, polygons, shape measurements.

Centroids are computed here once, and ownership (stitching) is decided from them, so the anchor a region
uses to keep a nucleus is exactly the anchor stored in the table.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.measure import perimeter as sk_perimeter
from skimage.measure import regionprops

from histoseg.types import InstanceTable

MEASUREMENTS = ("area_um2", "perimeter_um", "eccentricity", "solidity", "mean_hematoxylin")

# Ruifrok & Johnston H&E optical-density vectors (published constants); row 0 is hematoxylin.
_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
_HED /= np.linalg.norm(_HED, axis=1, keepdims=True)
_HED_INV = np.linalg.inv(_HED)


def hematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Hematoxylin optical density (colour deconvolution), float32 (H, W)."""
    od = -np.log(np.maximum(rgb.astype(np.float32), 1.0) / 255.0)
    return (od.reshape(-1, 3) @ _HED_INV[:, 0].astype(np.float32)).reshape(rgb.shape[:2])


def instance_centroids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[tuple[slice, slice] | None]]:
    """Ids present, their centroids (y, x) in label-pixel units (pixel i spans [i, i+1)), and slices."""
    n = int(labels.max())
    if n == 0:
        return np.zeros(0, np.int64), np.zeros((0, 2)), []
    idx = np.arange(1, n + 1)
    counts = ndi.sum_labels(np.ones_like(labels, dtype=np.float64), labels, idx)
    present = counts > 0
    ys, xs = np.indices(labels.shape, dtype=np.float64)
    cy = ndi.sum_labels(ys, labels, idx)[present] / counts[present] + 0.5
    cx = ndi.sum_labels(xs, labels, idx)[present] / counts[present] + 0.5
    slices = ndi.find_objects(labels)
    return idx[present], np.stack([cy, cx], axis=1), slices


def _polygon(mask: np.ndarray) -> np.ndarray:
    """Outer contour of a mask crop as (K, 2) x, y at pixel centres; tiny masks give their pixel box."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if contours:
        c = max(contours, key=cv2.contourArea).reshape(-1, 2).astype(np.float64) + 0.5
        if len(np.unique(c, axis=0)) >= 3 and cv2.contourArea(c.astype(np.float32)) > 0:
            return c
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def measure_instances(
    labels: np.ndarray,
    keep: np.ndarray,
    centroids_yx: np.ndarray,
    slices: list[tuple[slice, slice] | None],
    *,
    origin_yx: tuple[int, int],
    image: np.ndarray,
    np_prob: np.ndarray,
    tp_prob: np.ndarray | None,
    class_names: tuple[str, ...],
    class_colors: tuple[tuple[int, int, int], ...],
    mpp0: float,
    scale: float,
    plane_shape: tuple[int, int],
) -> InstanceTable:
    """Measure the instances ``keep`` (label ids) of ``labels`` whose pixel [0, 0] is plane ``origin_yx``.

    ``centroids_yx`` are local (label-image) centroids aligned with ``keep``.
    """
    mpp = mpp0 * scale
    oy, ox = origin_yx
    n = len(keep)
    table = InstanceTable.empty(class_names, class_colors, mpp0, scale, plane_shape, MEASUREMENTS)
    if n == 0:
        return table
    hem = hematoxylin(image)
    cls_ids = np.zeros(n, np.uint8)
    probs = np.zeros(n, np.float32)
    bboxes = np.zeros((n, 4), np.float64)
    offsets = np.zeros((n, 2), np.int64)
    meas = {k: np.zeros(n, np.float64) for k in MEASUREMENTS}
    polys: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    for i, lid in enumerate(keep):
        sl = slices[int(lid) - 1]
        if sl is None:
            continue
        mask = labels[sl] == lid
        y0, x0 = sl[0].start, sl[1].start
        offsets[i] = (oy + y0, ox + x0)
        masks.append(mask)
        if tp_prob is not None and tp_prob.shape[0] > 1:
            crop = tp_prob[:, sl[0], sl[1]][:, mask]  # (C, k)
            votes = np.bincount(np.argmax(crop[1:], axis=0), minlength=crop.shape[0] - 1)
            c = int(np.argmax(votes))
            cls_ids[i] = c + 1
            probs[i] = float(crop[c + 1].mean())
        else:
            cls_ids[i] = 1
            probs[i] = float(np_prob[sl][mask].mean())
        poly = _polygon(mask)
        poly[:, 0] += ox + x0
        poly[:, 1] += oy + y0
        polys.append(poly * scale)
        bboxes[i] = (
            (ox + x0) * scale,
            (oy + y0) * scale,
            (ox + sl[1].stop) * scale,
            (oy + sl[0].stop) * scale,
        )
        rp = regionprops(mask.astype(np.uint8))[0]
        meas["area_um2"][i] = float(mask.sum()) * mpp * mpp
        meas["perimeter_um"][i] = float(sk_perimeter(mask)) * mpp
        meas["eccentricity"][i] = float(rp.eccentricity)
        meas["solidity"][i] = float(rp.solidity)
        meas["mean_hematoxylin"][i] = float(hem[sl][mask].mean())
    cyx = centroids_yx + np.array([oy, ox], dtype=np.float64)
    table.ids = np.zeros(n, np.uint32)
    table.anchors = np.floor(cyx).astype(np.int64)
    table.centroids = np.stack([cyx[:, 1], cyx[:, 0]], axis=1) * scale
    table.bboxes = bboxes
    table.class_ids = cls_ids
    table.probabilities = probs
    table.polygons = polys
    table.masks = masks
    table.mask_offsets = offsets
    table.measurements = meas
    return table
