"""Deterministic global ids (stitching rule 5) over the concatenation of per-region tables.

Ids rank every owned nucleus of the slide by (anchor y, anchor x), then mask origin, then area: a global
raster order of the plane, so they depend neither on the order in which tasks finished nor on the region
size (each nucleus has one owner, and its anchor, mask and area are the same whichever region owned it).
"""

from __future__ import annotations

import numpy as np

from histoseg.types import InstanceTable, Region


def order_within_region(table: InstanceTable) -> np.ndarray:
    """Permutation sorting a table's instances by anchor (y, x), then mask origin, then area (used on a
    region's table and on the whole slide's)."""
    if len(table) == 0:
        return np.zeros(0, np.int64)
    area = np.array([m.sum() for m in table.masks], dtype=np.int64)
    keys = (area, table.mask_offsets[:, 1], table.mask_offsets[:, 0], table.anchors[:, 1], table.anchors[:, 0])
    return np.lexsort(keys)


def stitch(results: list[tuple[Region, InstanceTable]], template: InstanceTable) -> InstanceTable:
    """Concatenate owned instances of every region with global ids 1..N in the plane's raster order (rule 5).

    ``template`` (an empty table) supplies the plane and the measurement names, also when there are no
    instances at all.
    """
    ordered = sorted(results, key=lambda rt: (rt[0].row, rt[0].col))
    out = InstanceTable.concat([template, *(t for _, t in ordered)])
    out = out.take(order_within_region(out))
    out.ids = np.arange(1, len(out) + 1, dtype=np.uint32)
    return out
