"""Tissue detection on a thumbnail: Otsu on HSV saturation, then morphology.

Brightfield background (glass) is bright and grey; stained tissue is coloured. Saturation separates them
better than brightness on pale slides; a floor on the threshold keeps an all-glass thumbnail empty.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

MIN_SATURATION = 20  # of 255: below this nothing counts as tissue, whatever Otsu says


def tissue_mask(thumb: np.ndarray, threshold: float | None = None, min_area_px: int = 16) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail."""
    hsv = cv2.cvtColor(np.ascontiguousarray(thumb[..., :3]), cv2.COLOR_RGB2HSV)
    sat = cv2.GaussianBlur(hsv[..., 1], (5, 5), 0)
    if threshold is None:
        t = float(threshold_otsu(sat)) if sat.max() > sat.min() else 255.0
        t = max(t, MIN_SATURATION)
    else:
        t = float(threshold)
    mask = sat > t
    # very dark pixels (pen marks are saturated too, but black debris is not) also count as tissue-ish
    mask &= hsv[..., 2] > 30
    mask = ndi.binary_closing(mask, structure=np.ones((5, 5)), iterations=2)
    mask = ndi.binary_fill_holes(mask)
    lab, n = ndi.label(mask)
    if n:
        sizes = np.bincount(lab.ravel())
        keep = sizes >= min_area_px
        keep[0] = False
        mask = keep[lab]
    return np.asarray(mask, dtype=bool)
