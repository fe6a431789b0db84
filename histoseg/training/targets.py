"""Training targets of the three heads, computed from an instance map: NP (nucleus pixels), HV, TP (types)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage


def _compact_ids(inst: np.ndarray) -> np.ndarray:
    """Return an int32 copy-or-view of ``inst`` whose ids are small enough for ``find_objects``."""
    if inst.dtype.kind not in "iu":
        raise TypeError(f"instance map must be an integer array, got {inst.dtype}")
    if inst.size and inst.min() < 0:
        raise ValueError("instance map has negative ids")
    max_id = int(inst.max()) if inst.size else 0
    if max_id <= 4 * 65536 or max_id <= 4 * inst.size:
        return inst.astype(np.int32, copy=False)
    _, inverse = np.unique(inst, return_inverse=True)  # 0 stays 0: it is the smallest value
    return inverse.reshape(inst.shape).astype(np.int32)


def hv_maps(inst: np.ndarray) -> np.ndarray:
    """Horizontal and vertical maps of an (H, W) instance map: (2, H, W) float32, channel 0 = x, 1 = y.

    For each instance, the x (column) and y (row) offset of every pixel from the instance's centroid,
    divided per instance and per axis by the largest absolute offset within it, so values lie in
    [-1, 1] (an axis with no extent stays 0). Background is 0. One crop per instance
    (``scipy.ndimage.find_objects``), so cost scales with nucleus area, not image area times count.
    """
    labels = _compact_ids(np.asarray(inst))
    if labels.ndim != 2:
        raise ValueError(f"instance map must be 2-D, got shape {labels.shape}")
    out = np.zeros((2, *labels.shape), dtype=np.float32)
    for idx, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        ys, xs = np.nonzero(labels[sl] == idx)
        dx = xs - xs.mean()
        dy = ys - ys.mean()
        mx, my = np.abs(dx).max(), np.abs(dy).max()
        if mx > 0:
            dx /= mx
        if my > 0:
            dy /= my
        out[0][sl][ys, xs] = dx
        out[1][sl][ys, xs] = dy
    return out


def np_target(inst_or_semantic: np.ndarray) -> np.ndarray:
    """Nucleus-pixel target (H, W) uint8: 1 where the instance id is > 0 (or the semantic mask is True)."""
    return (np.asarray(inst_or_semantic) > 0).astype(np.uint8)


def type_target(inst: np.ndarray, inst_types: Mapping[int, int] | np.ndarray) -> np.ndarray:
    """Type map (H, W) uint8: each instance's pixels get its type, background and unlisted ids 0.

    ``inst_types`` is a mapping ``{instance id: type}`` or a lookup array indexed by instance id.
    """
    labels = np.asarray(inst)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"instance map must be an integer array, got {labels.dtype}")
    max_id = int(labels.max()) if labels.size else 0
    lut = np.zeros(max_id + 1, dtype=np.uint8)
    if isinstance(inst_types, np.ndarray):
        n = min(len(inst_types), max_id + 1)
        lut[:n] = inst_types[:n]
    else:
        for i, t in inst_types.items():
            if 0 < i <= max_id:
                lut[i] = t
    lut[0] = 0
    out: np.ndarray = lut[labels]
    return out
