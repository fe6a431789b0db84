"""Deterministic global ids (stitching rule 5) over the concatenation of per-region tables.

Ids are an exclusive prefix sum of per-region counts in raster order of regions, then rank within a
region by (anchor y, anchor x); they never depend on the order in which tasks finished.
"""

from __future__ import annotations

import numpy as np

from histoseg.types import InstanceTable, Region


def order_within_region(table: InstanceTable) -> np.ndarray:
    """Permutation sorting a region's instances by anchor (y, x), then mask origin, then area."""
    if len(table) == 0:
        return np.zeros(0, np.int64)
    area = np.array([m.sum() for m in table.masks], dtype=np.int64)
    keys = (area, table.mask_offsets[:, 1], table.mask_offsets[:, 0], table.anchors[:, 1], table.anchors[:, 0])
    return np.lexsort(keys)


def stitch(results: list[tuple[Region, InstanceTable]], template: InstanceTable) -> InstanceTable:
    """Concatenate owned instances of every region with global ids 1..N (rule 5).

    ``template`` (an empty table) supplies the plane and the measurement names, also when there are no
    instances at all.
    """
    ordered = sorted(results, key=lambda rt: (rt[0].row, rt[0].col))
    out = InstanceTable.concat([template, *(t.take(order_within_region(t)) for _, t in ordered)])
    out.ids = np.arange(1, len(out) + 1, dtype=np.uint32)
    return out
