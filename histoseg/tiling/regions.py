"""Region planning: half-open cores on the output chunk grid, each with a halo, tissue-filtered.

Cores ``[i*S, (i+1)*S) x [j*S, (j+1)*S)`` partition the processing plane (stitching rule 1); the
halo comes from the model card (context radius + largest nucleus), never from a constant here.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from histoseg.errors import ConfigError
from histoseg.types import Box, Region


def plan_regions(
    plane_shape: tuple[int, int],
    region_size: int,
    halo: int,
    tissue: np.ndarray | None = None,
    min_tissue_fraction: float = 0.0,
) -> list[Region]:
    """Regions in raster order; with a tissue mask (any resolution covering the plane), regions whose
    core holds less than ``min_tissue_fraction`` tissue (after a small dilation) are skipped."""
    if region_size <= 0 or halo < 0:
        raise ConfigError(f"invalid region size {region_size} or halo {halo}")
    h, w = plane_shape
    rows, cols = math.ceil(h / region_size), math.ceil(w / region_size)
    frac = None
    if tissue is not None:
        frac = _tissue_fraction(tissue, (rows, cols), plane_shape, region_size)
    out: list[Region] = []
    for r in range(rows):
        for c in range(cols):
            if frac is not None and (frac[r, c] <= 0 or frac[r, c] < min_tissue_fraction):
                continue
            core = Box(c * region_size, r * region_size, region_size, region_size)
            out.append(Region(row=r, col=c, core=core, halo=halo))
    return out


def _tissue_fraction(
    tissue: np.ndarray, grid: tuple[int, int], plane_shape: tuple[int, int], region_size: int
) -> np.ndarray:
    """Fraction of each core covered by (slightly dilated) tissue, from a low-resolution mask."""
    mh, mw = tissue.shape
    sy, sx = mh / plane_shape[0], mw / plane_shape[1]  # mask px per plane px
    m = cv2.dilate(tissue.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(np.float64)
    ii = np.pad(m.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    rows, cols = grid
    frac = np.zeros(grid)
    for r in range(rows):
        y0 = int(math.floor(r * region_size * sy))
        y1 = max(y0 + 1, min(mh, int(math.ceil((r + 1) * region_size * sy))))
        for c in range(cols):
            x0 = int(math.floor(c * region_size * sx))
            x1 = max(x0 + 1, min(mw, int(math.ceil((c + 1) * region_size * sx))))
            y0c, x0c = min(y0, mh - 1), min(x0, mw - 1)
            s = ii[y1, x1] - ii[y0c, x1] - ii[y1, x0c] + ii[y0c, x0c]
            frac[r, c] = s / max(1, (y1 - y0c) * (x1 - x0c))
    return frac
