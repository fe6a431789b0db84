"""QuPath GeoJSON export: a FeatureCollection of detection objects, streamed feature by feature.

Each feature follows QuPath's import rules (design.md section 7, facts.md): a UUID ``id``
(``uuid5`` of the slide key and the nucleus id, so reruns give the same ids), a valid ``Polygon`` in
level-0 pixels rounded to 2 decimals, ``objectType = "detection"``, a classification with the model
card's ``name`` and ``color`` (:meth:`InstanceTable.class_name`; class id 0 = unclassified, written
without a classification), and ``measurements`` as a dict named the way QuPath names its own
(:data:`QUPATH_MEASUREMENT_NAMES`, e.g. ``"Nucleus: Area µm^2"``). A non-finite measurement is left out
of that feature: older QuPath versions reject ``"NaN"`` strings, and a missing measurement reads as NaN
in every version. Minimum QuPath version: 0.4 (GeoJSON import with ``measurements`` as a dict and
``classification`` objects, as listed in facts.md); 0.6+ also checks polygon validity, which we meet.
"""

from __future__ import annotations

import contextlib
import gzip as gzip_module
import io
import json
import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from shapely.geometry import Polygon

from histoseg.atomic import atomic_file
from histoseg.export.gcpause import gc_paused
from histoseg.export.geojson_text import coordinate_texts, feature_ids
from histoseg.export.geometry import RepairStats, clean_polygons
from histoseg.types import InstanceTable

__all__ = [
    "NUCLEUS_NAMESPACE",
    "QUPATH_MEASUREMENT_NAMES",
    "GeoJSONWriter",
    "feature_uuid",
    "qupath_name",
    "write_geojson",
]

NUCLEUS_NAMESPACE = uuid.UUID("6f1c1f0e-3b7a-5d3e-9a57-2f4c8e6b9d10")
"""Fixed namespace of histoseg nucleus UUIDs (never change it: ids must stay stable across versions)."""

QUPATH_MEASUREMENT_NAMES: dict[str, str] = {
    "area_um2": "Nucleus: Area µm^2",
    "perimeter_um": "Nucleus: Perimeter µm",
    "eccentricity": "Nucleus: Eccentricity",
    "solidity": "Nucleus: Solidity",
    "mean_hematoxylin": "Nucleus: Hematoxylin OD mean",
    "probability": "Detection probability",
    "id": "Nucleus ID",
}
"""Table column (Parquet, snake_case) -> QuPath measurement name (GeoJSON), the one table of name pairs.
``Nucleus ID`` equals the Parquet ``id`` and the value of the nucleus in the Zarr ``labels/nuclei``."""


def feature_uuid(slide_key: str, nucleus_id: int) -> str:
    """Deterministic UUID string of a nucleus: ``uuid5(NUCLEUS_NAMESPACE, f"{slide_key}/{id}")`` (the writer makes
    a band's at once: :func:`histoseg.export.geojson_text.feature_ids`)."""
    return feature_ids(NUCLEUS_NAMESPACE, f"{slide_key}/", [int(nucleus_id)])[0]


def qupath_name(column: str) -> str:
    """QuPath measurement name of a table column; a column missing from the table keeps its name."""
    return QUPATH_MEASUREMENT_NAMES.get(column, column)


def _classification(table: InstanceTable, class_id: int) -> dict[str, Any] | None:
    """QuPath classification of a class id (None for 0: QuPath's "Unclassified" has no classification)."""
    if class_id == 0:
        return None
    return {"name": table.class_name(class_id), "color": list(table.class_color(class_id))}


def _polygons(table: InstanceTable, polygons: Sequence[Polygon] | None, stats: RepairStats) -> Sequence[Polygon]:
    """The given cleaned polygons (one per nucleus), or the table's cleaned now."""
    if polygons is None:
        return clean_polygons(table, stats)
    if len(polygons) != len(table):
        raise ValueError(f"{len(polygons)} cleaned polygons for {len(table)} nuclei")
    return polygons


def geojson_target(path: str | os.PathLike[str], gzip: bool) -> Path:
    """Final file name: ``.gz`` appended when compressing and ``path`` lacks it."""
    p = Path(path)
    if gzip and p.suffix != ".gz":
        p = p.with_name(p.name + ".gz")
    return p


class GeoJSONWriter:
    """A QuPath GeoJSON FeatureCollection written table after table (a slide's bands), then closed.

    Use as a context manager: the file appears atomically when the block ends without an error, and
    not at all otherwise. ``gzip=True`` (or a ``path`` ending in ``.gz``) writes a gzip stream; ``.gz`` is
    appended to ``path`` when missing (see :func:`geojson_target`). ``written`` counts the features.
    """

    def __init__(self, path: str | os.PathLike[str], *, slide_key: str, gzip: bool = False) -> None:
        self.compressed = gzip or Path(path).suffix == ".gz"
        self.target = geojson_target(path, self.compressed)
        self.slide_key = slide_key
        self.written = 0
        self.stats = RepairStats()
        self._stack = contextlib.ExitStack()
        self._out: TextIO | None = None

    def __enter__(self) -> GeoJSONWriter:
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(atomic_file(self.target))
            raw = stack.enter_context(open(tmp, "wb", buffering=1 << 20))
            if self.compressed:  # mtime=0, no name in the header: identical tables give identical bytes
                gz = stack.enter_context(gzip_module.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0))
                self._out = stack.enter_context(io.TextIOWrapper(gz, encoding="utf-8", newline="\n"))
            else:
                self._out = stack.enter_context(io.TextIOWrapper(raw, encoding="utf-8", newline="\n"))
            self._out.write('{"type":"FeatureCollection","features":[\n')
            self._stack = stack.pop_all()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        stack, self._stack = self._stack, contextlib.ExitStack()
        out, self._out = self._out, None
        if exc_type is not None:  # the temporary file is removed; nothing appears
            stack.__exit__(exc_type, exc, tb)
            return
        with stack:  # closes the streams, then renames the temporary file (removes it if this fails)
            if out is not None:
                out.write("\n]}\n")
        self.stats.log(f"GeoJSON {self.target.name}")

    def write(self, table: InstanceTable, polygons: Sequence[Polygon] | None = None) -> int:
        """Append ``table``'s nuclei as features; return how many. ``polygons``: the table's polygons already
        cleaned (``geometry.clean_polygons``; the caller logs their repairs), so two writers repair them once;
        otherwise they are repaired here (:mod:`histoseg.export.geometry`), counted and logged at the end."""
        out = self._out
        if out is None:
            raise RuntimeError("GeoJSONWriter.write outside its with-block")
        with gc_paused():  # a list of values per nucleus (histoseg.export.gcpause)
            return self._write(out, table, polygons)

    def _write(self, out: TextIO, table: InstanceTable, polygons: Sequence[Polygon] | None) -> int:
        n = len(table)
        for name, col in table.measurements.items():
            if len(col) != n:
                raise ValueError(f"measurement {name!r} has {len(col)} values for {n} nuclei")
        names = [k for k in table.measurements if k not in ("probability", "id")]
        columns = [np.asarray(table.measurements[k], dtype=np.float64) for k in names]
        columns.append(np.asarray(table.probabilities, dtype=np.float64))
        keys = [json.dumps(qupath_name(k)) + ":" for k in [*names, "probability"]]  # as json.dumps writes keys
        id_key = json.dumps(qupath_name("id")) + ":"
        classes = {}
        for c in np.unique(table.class_ids).tolist():
            cls = _classification(table, int(c))
            classes[c] = "" if cls is None else '"classification":' + json.dumps(cls, separators=(",", ":")) + ","
        # the band's text in bulk (histoseg.export.geojson_text): the same bytes as json.dumps of each feature
        coordinates = coordinate_texts(_polygons(table, polygons, self.stats))
        ids = [int(i) for i in table.ids]
        uuids = feature_ids(NUCLEUS_NAMESPACE, f"{self.slide_key}/", ids)
        values = np.stack(columns, axis=1)
        finite: list[bool] = np.asarray(np.isfinite(values).all(axis=1)).tolist()
        rows: list[list[float]] = values.tolist()
        class_ids: list[int] = table.class_ids.tolist()
        parts = []
        for i in range(n):
            if finite[i]:
                pairs = [*map(str.__add__, keys, map(float.__repr__, rows[i]))]
            else:  # omitted, never "NaN": older QuPath rejects the strings
                pairs = [k + repr(v) for k, v in zip(keys, rows[i], strict=True) if math.isfinite(v)]
            pairs.append(id_key + str(ids[i]))
            parts.append(
                '{"type":"Feature","id":"' + uuids[i] + '","geometry":{"type":"Polygon","coordinates":'
                + coordinates[i] + '},"properties":{"objectType":"detection",' + classes[class_ids[i]]
                + '"measurements":{' + ",".join(pairs) + '},"isLocked":false}}'
            )
        if parts:
            out.write((",\n" if self.written else "") + ",\n".join(parts))
            self.written += n
        return n


def write_geojson(
    table: InstanceTable,
    path: str | os.PathLike[str],
    *,
    slide_key: str,
    gzip: bool = False,
    polygons: Sequence[Polygon] | None = None,
) -> int:
    """Write ``table`` as a QuPath GeoJSON FeatureCollection (:class:`GeoJSONWriter`, one table); return the
    number of features written."""
    with GeoJSONWriter(path, slide_key=slide_key, gzip=gzip) as writer:
        writer.write(table, polygons)
    return writer.written
