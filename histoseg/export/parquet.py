"""Parquet nucleus table: one row per nucleus, polygons as WKB (GeoParquet 1.0 metadata).

Columns: ``id`` (uint32), ``centroid_x``, ``centroid_y``, ``bbox_x0``, ``bbox_y0``, ``bbox_x1``,
``bbox_y1`` (float64, level-0 pixels), ``class_id`` (uint8: 0 background/unclassified, k >= 1 the
model card's class k), ``class_name`` (dictionary string, :meth:`InstanceTable.class_name`),
``probability`` (float32), every measurement of the table under its machine-friendly snake_case name
(float64, NaN kept as NaN; ``area_um2``, ``perimeter_um``, ...), ``polygon`` (WKB of the same repaired
polygon as the GeoJSON, level-0 pixels).

File key-value metadata: ``histoseg`` (JSON: mpp0, mpp, scale, plane_shape, class_names,
class_colors, and ``qupath_names``: column -> the GeoJSON's QuPath measurement name) and ``geo``
(GeoParquet: ``polygon`` is the primary WKB column, no CRS since the
coordinates are pixels), so geopandas ``read_parquet`` works as well as plain pyarrow.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from shapely.geometry import Polygon

from histoseg.export.atomic import atomic_file
from histoseg.export.geojson import QUPATH_MEASUREMENT_NAMES
from histoseg.export.geometry import RepairStats, iter_clean_polygons
from histoseg.types import InstanceTable

__all__ = ["FIXED_COLUMNS", "write_parquet"]

FIXED_COLUMNS = (
    "id",
    "centroid_x",
    "centroid_y",
    "bbox_x0",
    "bbox_y0",
    "bbox_x1",
    "bbox_y1",
    "class_id",
    "class_name",
    "probability",
)


def _class_names(table: InstanceTable) -> pa.Array:
    """``class_name`` column: a dictionary over every class id (:meth:`InstanceTable.class_name`)."""
    names = [table.class_name(c) for c in table.class_id_range()]
    indices = pa.array(np.asarray(table.class_ids, dtype=np.int32), type=pa.int32())
    return pa.DictionaryArray.from_arrays(indices, pa.array(names, type=pa.string()))


def _file_metadata(table: InstanceTable, bbox: list[float] | None) -> dict[bytes, bytes]:
    meta: dict[str, Any] = {
        "mpp0": float(table.mpp0),
        "mpp": float(table.mpp),
        "scale": float(table.scale),
        "plane_shape": [int(v) for v in table.plane_shape],
        "class_names": list(table.class_names),
        "class_colors": [[int(c) for c in rgb] for rgb in table.class_colors],
        "class_ids": "class id k >= 1 is class_names[k - 1]; 0 is background/unclassified",
        "qupath_names": dict(QUPATH_MEASUREMENT_NAMES),
        "coordinates": "level-0 pixels, origin top-left",
    }
    geo_col: dict[str, Any] = {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": None}
    if bbox is not None:
        geo_col["bbox"] = bbox
    geo = {"version": "1.0.0", "primary_column": "polygon", "columns": {"polygon": geo_col}}
    return {b"histoseg": json.dumps(meta).encode(), b"geo": json.dumps(geo).encode()}


def write_parquet(
    table: InstanceTable, path: str | os.PathLike[str], *, polygons: Sequence[Polygon] | None = None
) -> None:
    """Write the nucleus table of ``table`` to ``path`` (zstd-compressed Parquet), atomically.

    A measurement named like a fixed column (e.g. ``probability``) is skipped: the fixed column wins.
    ``polygons``: the table's polygons already cleaned (``geometry.clean_polygons``; the caller logs their
    repairs), so the GeoJSON and Parquet writers repair them once.
    """
    n = len(table)
    stats = RepairStats()
    if polygons is None:
        polys = list(iter_clean_polygons(table, stats))
    elif len(polygons) != n:
        raise ValueError(f"{len(polygons)} cleaned polygons for {n} nuclei")
    else:
        polys = list(polygons)
    centroids = np.asarray(table.centroids, dtype=np.float64).reshape(n, 2)
    bboxes = np.asarray(table.bboxes, dtype=np.float64).reshape(n, 4)
    columns: dict[str, pa.Array] = {
        "id": pa.array(np.asarray(table.ids, dtype=np.uint32)),
        "centroid_x": pa.array(centroids[:, 0]),
        "centroid_y": pa.array(centroids[:, 1]),
        "bbox_x0": pa.array(bboxes[:, 0]),
        "bbox_y0": pa.array(bboxes[:, 1]),
        "bbox_x1": pa.array(bboxes[:, 2]),
        "bbox_y1": pa.array(bboxes[:, 3]),
        "class_id": pa.array(np.asarray(table.class_ids, dtype=np.uint8)),
        "class_name": _class_names(table),
        "probability": pa.array(np.asarray(table.probabilities, dtype=np.float32)),
    }
    for name, values in table.measurements.items():
        if name in columns or name == "polygon":
            continue
        col = np.asarray(values, dtype=np.float64)
        if col.shape != (n,):
            raise ValueError(f"measurement {name!r} has shape {col.shape}, expected ({n},)")
        columns[name] = pa.array(col, from_pandas=False)
    wkb = shapely.to_wkb(np.array(polys, dtype=object), output_dimension=2) if n else np.array([], object)
    columns["polygon"] = pa.array(list(wkb), type=pa.binary())
    bbox = None
    if n:
        bounds = shapely.bounds(np.array(polys, dtype=object))
        bbox = [float(v) for v in (*bounds[:, :2].min(axis=0), *bounds[:, 2:].max(axis=0))]
    arrow = pa.table(columns).replace_schema_metadata(_file_metadata(table, bbox))
    with atomic_file(path) as tmp:
        pq.write_table(arrow, tmp, compression="zstd")
    stats.log(f"Parquet {os.fspath(path)}")
