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
coordinates are pixels; no ``bbox``, which is optional: the file is written band after band, in row groups of
:data:`ROW_GROUP` rows, and its metadata comes first), so geopandas ``read_parquet`` works as well as plain pyarrow.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from shapely.geometry import Polygon

from histoseg.atomic import atomic_file
from histoseg.export.geojson import QUPATH_MEASUREMENT_NAMES
from histoseg.export.geometry import RepairStats, clean_polygons
from histoseg.types import InstanceTable

__all__ = ["FIXED_COLUMNS", "ROW_GROUP", "ParquetTableWriter", "write_parquet"]

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


ROW_GROUP = 65_536
"""Rows per Parquet row group: fixed, so the file's layout does not depend on how the slide was cut into bands."""


def _file_metadata(table: InstanceTable) -> dict[bytes, bytes]:
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
    # no "bbox" (optional in GeoParquet 1.0): the file is written band after band, and its metadata first
    geo_col: dict[str, Any] = {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": None}
    geo = {"version": "1.0.0", "primary_column": "polygon", "columns": {"polygon": geo_col}}
    return {b"histoseg": json.dumps(meta).encode(), b"geo": json.dumps(geo).encode()}


def _measurement_names(table: InstanceTable) -> list[str]:
    """The measurement columns of ``table`` (a measurement named like a fixed column is skipped)."""
    return [k for k in table.measurements if k not in FIXED_COLUMNS and k != "polygon"]


def _arrow_table(table: InstanceTable, polys: Sequence[Polygon], measurements: Sequence[str]) -> pa.Table:
    """The rows of ``table`` as an Arrow table with the file's columns (polygons already cleaned)."""
    n = len(table)
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
    for name in measurements:
        if name not in table.measurements:
            raise ValueError(f"measurement {name!r} is missing from this table")
        col = np.asarray(table.measurements[name], dtype=np.float64)
        if col.shape != (n,):
            raise ValueError(f"measurement {name!r} has shape {col.shape}, expected ({n},)")
        columns[name] = pa.array(col, from_pandas=False)
    wkb = shapely.to_wkb(np.array(polys, dtype=object), output_dimension=2) if n else np.array([], object)
    columns["polygon"] = pa.array(wkb, type=pa.binary())
    return pa.table(columns)


class ParquetTableWriter:
    """The nucleus table written table after table (a slide's bands) in row groups of :data:`ROW_GROUP` rows.

    ``template``: a table (empty is fine) of the slide: its plane gives the file metadata and its measurement
    names the columns. Use as a context manager: the file appears atomically when the block ends without an
    error, and not at all otherwise.
    """

    def __init__(self, path: str | os.PathLike[str], template: InstanceTable) -> None:
        self.path = path
        self.measurements = _measurement_names(template)
        empty = InstanceTable.empty(template.plane, tuple(self.measurements))
        self.schema = _arrow_table(empty, [], self.measurements).schema.with_metadata(_file_metadata(template))
        self.written = 0
        self.stats = RepairStats()
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> ParquetTableWriter:
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(atomic_file(self.path))
            self._writer = stack.enter_context(pq.ParquetWriter(tmp, self.schema, compression="zstd"))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        stack, self._stack = self._stack, contextlib.ExitStack()
        if exc_type is not None:  # the temporary file is removed; nothing appears
            self._writer, self._pending = None, []
            stack.__exit__(exc_type, exc, tb)
            return
        with stack:  # closes the Parquet writer, then renames the temporary file (removes it if this fails)
            self._flush(final=True)
            self._writer = None
        self.stats.log(f"Parquet {os.fspath(self.path)}")

    def write(self, table: InstanceTable, polygons: Sequence[Polygon] | None = None) -> int:
        """Append ``table``'s nuclei; return how many. ``polygons``: the table's polygons already cleaned
        (``geometry.clean_polygons``), so the GeoJSON and Parquet writers repair them once."""
        if self._writer is None:
            raise RuntimeError("ParquetTableWriter.write outside its with-block")
        n = len(table)
        if polygons is None:
            polys: Sequence[Polygon] = clean_polygons(table, self.stats)
        elif len(polygons) != n:
            raise ValueError(f"{len(polygons)} cleaned polygons for {n} nuclei")
        else:
            polys = polygons
        if n:
            self._pending.append(_arrow_table(table, polys, self.measurements).cast(self.schema))
            self._pending_rows += n
            self.written += n
            self._flush(final=False)
        return n

    def _flush(self, final: bool) -> None:
        """Write the pending rows in whole row groups (all of them when ``final``)."""
        if self._writer is None or not self._pending_rows or (self._pending_rows < ROW_GROUP and not final):
            return
        rows = pa.concat_tables(self._pending)
        whole = rows.num_rows if final else rows.num_rows - rows.num_rows % ROW_GROUP
        self._writer.write_table(rows.slice(0, whole), row_group_size=ROW_GROUP)
        rest = rows.slice(whole)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows


def write_parquet(
    table: InstanceTable, path: str | os.PathLike[str], *, polygons: Sequence[Polygon] | None = None
) -> None:
    """Write the nucleus table of ``table`` to ``path`` (zstd-compressed Parquet, :class:`ParquetTableWriter`,
    one table), atomically. A measurement named like a fixed column (e.g. ``probability``) is skipped: the
    fixed column wins. ``polygons``: the table's polygons already cleaned (``geometry.clean_polygons``; the
    caller logs their repairs), so the GeoJSON and Parquet writers repair them once.
    """
    with ParquetTableWriter(path, table) as writer:
        writer.write(table, polygons)
