"""Deterministic global ids (stitching rule 5) and concatenation of per-region tables.

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


def take(table: InstanceTable, idx: np.ndarray) -> InstanceTable:
    """Rows ``idx`` of a table (a new table)."""
    il = [int(i) for i in idx]
    return InstanceTable(
        ids=table.ids[idx],
        anchors=table.anchors[idx],
        centroids=table.centroids[idx],
        bboxes=table.bboxes[idx],
        class_ids=table.class_ids[idx],
        probabilities=table.probabilities[idx],
        polygons=[table.polygons[i] for i in il],
        masks=[table.masks[i] for i in il],
        mask_offsets=table.mask_offsets[idx],
        measurements={k: v[idx] for k, v in table.measurements.items()},
        class_names=table.class_names,
        class_colors=table.class_colors,
        mpp0=table.mpp0,
        scale=table.scale,
        plane_shape=table.plane_shape,
        edge_touching=table.edge_touching,
    )


def stitch(results: list[tuple[Region, InstanceTable]], template: InstanceTable) -> InstanceTable:
    """Concatenate owned instances of every region with global ids 1..N (rule 5).

    ``template`` supplies class names, scales and plane shape when there are no instances at all.
    """
    ordered = sorted(results, key=lambda rt: (rt[0].row, rt[0].col))
    parts = [take(t, order_within_region(t)) for _, t in ordered]
    parts = [p for p in parts if len(p)]
    edge = sum(t.edge_touching for _, t in ordered)
    if not parts:
        out = take(template, np.zeros(0, np.int64))
        out.edge_touching = edge
        return out
    n = sum(len(p) for p in parts)
    out = InstanceTable(
        ids=np.arange(1, n + 1, dtype=np.uint32),
        anchors=np.concatenate([p.anchors for p in parts]),
        centroids=np.concatenate([p.centroids for p in parts]),
        bboxes=np.concatenate([p.bboxes for p in parts]),
        class_ids=np.concatenate([p.class_ids for p in parts]),
        probabilities=np.concatenate([p.probabilities for p in parts]),
        polygons=[poly for p in parts for poly in p.polygons],
        masks=[m for p in parts for m in p.masks],
        mask_offsets=np.concatenate([p.mask_offsets for p in parts]),
        measurements={k: np.concatenate([p.measurements[k] for p in parts]) for k in parts[0].measurements},
        class_names=template.class_names,
        class_colors=template.class_colors,
        mpp0=template.mpp0,
        scale=template.scale,
        plane_shape=template.plane_shape,
        edge_touching=edge,
    )
    return out
