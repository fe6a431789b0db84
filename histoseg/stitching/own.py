"""Ownership (stitching rules 3-4): a region keeps exactly the instances anchored in its core.

The anchor is ``floor`` of the plane centroid. Cores partition the plane, so each instance is kept by
exactly one region and no region needs its neighbours.
"""

from __future__ import annotations

import numpy as np

from histoseg.types import Region


def owned_mask(centroids_yx_plane: np.ndarray, region: Region) -> np.ndarray:
    """Boolean per instance: its anchor lies in ``region.owns`` (half-open): the core, or the bounding box of
    the core's tissue cells (nuclei anchored outside it are not in tissue and would be dropped anyway)."""
    if len(centroids_yx_plane) == 0:
        return np.zeros(0, bool)
    a = np.floor(centroids_yx_plane).astype(np.int64)
    c = region.owns
    owned: np.ndarray = (a[:, 0] >= c.y) & (a[:, 0] < c.y1) & (a[:, 1] >= c.x) & (a[:, 1] < c.x1)
    return owned


def in_tissue(anchors_yx: np.ndarray, cells: np.ndarray, cell: int) -> np.ndarray:
    """Boolean per instance: its anchor (plane y, x) lies in a tissue cell of the ``cell``-px grid ``cells``.

    Decided per nucleus on a grid fixed by the slide, so the kept set does not depend on the region size."""
    if len(anchors_yx) == 0:
        return np.zeros(0, bool)
    a = np.asarray(anchors_yx, dtype=np.int64) // cell
    gy = np.clip(a[:, 0], 0, cells.shape[0] - 1)
    gx = np.clip(a[:, 1], 0, cells.shape[1] - 1)
    return np.asarray(cells[gy, gx], dtype=bool)


def touches_halo_edge(
    slices: list[tuple[slice, slice] | None],
    ids: np.ndarray,
    label_shape: tuple[int, int],
    region: Region,
    plane_shape: tuple[int, int],
) -> np.ndarray:
    """Boolean per instance: its bbox reaches an edge of the read box that lies inside the plane.

    Such an instance may be cut by the halo: the halo is too small for it (rule 4). Edges that coincide
    with or lie beyond the slide border do not count: there the slide itself ends.
    """
    rb = region.read
    h, w = label_shape
    out = np.zeros(len(ids), bool)
    for i, lid in enumerate(ids):
        sl = slices[int(lid) - 1]
        if sl is None:
            continue
        top = sl[0].start == 0 and rb.y > 0
        left = sl[1].start == 0 and rb.x > 0
        bottom = sl[0].stop == h and rb.y1 < plane_shape[0]
        right = sl[1].stop == w and rb.x1 < plane_shape[1]
        out[i] = top or left or bottom or right
    return out
