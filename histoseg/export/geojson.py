"""QuPath GeoJSON export: a FeatureCollection of detection objects, streamed feature by feature.

Each feature follows QuPath's import rules (design.md section 7, facts.md): a UUID ``id``
(``uuid5`` of the slide key and the nucleus id, so reruns give the same ids), a valid ``Polygon`` in
level-0 pixels rounded to 2 decimals, ``objectType = "detection"``, a classification with ``name`` and
``color``, and ``measurements`` as a dict whose non-finite values are the strings ``"NaN"``,
``"Infinity"``, ``"-Infinity"`` (the file never contains bare ``NaN`` tokens).
"""

from __future__ import annotations

import contextlib
import gzip as gzip_module
import io
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from shapely.geometry import Polygon

from histoseg.export.atomic import atomic_file
from histoseg.export.geometry import RepairStats, iter_clean_polygons
from histoseg.types import InstanceTable

__all__ = ["NUCLEUS_NAMESPACE", "feature_uuid", "json_number", "write_geojson"]

NUCLEUS_NAMESPACE = uuid.UUID("6f1c1f0e-3b7a-5d3e-9a57-2f4c8e6b9d10")
"""Fixed namespace of histoseg nucleus UUIDs (never change it: ids must stay stable across versions)."""

_UNKNOWN_COLOR = (128, 128, 128)


def feature_uuid(slide_key: str, nucleus_id: int) -> str:
    """Deterministic UUID string of a nucleus: ``uuid5(NUCLEUS_NAMESPACE, f"{slide_key}/{id}")``."""
    return str(uuid.uuid5(NUCLEUS_NAMESPACE, f"{slide_key}/{int(nucleus_id)}"))


def json_number(value: float) -> float | str:
    """A float as QuPath reads it: finite unchanged, else ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``."""
    v = float(value)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return v


def _ring(coords: Any) -> list[list[float]]:
    return np.asarray(coords, dtype=np.float64).round(2).tolist()  # type: ignore[no-any-return]


def _geometry(poly: Polygon) -> dict[str, Any]:
    rings = [_ring(poly.exterior.coords)] + [_ring(r.coords) for r in poly.interiors]
    return {"type": "Polygon", "coordinates": rings}


def _classification(table: InstanceTable, class_id: int) -> dict[str, Any]:
    if 0 <= class_id < len(table.class_names):
        name = table.class_names[class_id]
    else:
        name = f"class {class_id}"
    color = table.class_colors[class_id] if 0 <= class_id < len(table.class_colors) else _UNKNOWN_COLOR
    return {"name": name, "color": [int(c) for c in color]}


def geojson_target(path: str | os.PathLike[str], gzip: bool) -> Path:
    """Final file name: ``.gz`` appended when compressing and ``path`` lacks it."""
    p = Path(path)
    if gzip and p.suffix != ".gz":
        p = p.with_name(p.name + ".gz")
    return p


def write_geojson(
    table: InstanceTable, path: str | os.PathLike[str], *, slide_key: str, gzip: bool = False
) -> int:
    """Write ``table`` as a QuPath GeoJSON FeatureCollection; return the number of features written.

    ``gzip=True`` (or a ``path`` ending in ``.gz``) writes a gzip stream; ``.gz`` is appended to ``path``
    when missing (see :func:`geojson_target`). The file appears atomically. Polygons are repaired as in
    :mod:`histoseg.export.geometry`; repairs are counted and logged.
    """
    compressed = gzip or Path(path).suffix == ".gz"
    target = geojson_target(path, compressed)
    n = len(table)
    for name, col in table.measurements.items():
        if len(col) != n:
            raise ValueError(f"measurement {name!r} has {len(col)} values for {n} nuclei")
    names = [k for k in table.measurements if k not in ("probability", "id")]
    columns = [np.asarray(table.measurements[k], dtype=np.float64) for k in names]
    stats = RepairStats()
    classes = {int(c): _classification(table, int(c)) for c in np.unique(table.class_ids)}
    written = 0
    with atomic_file(target) as tmp, contextlib.ExitStack() as stack:
        raw = stack.enter_context(open(tmp, "wb", buffering=1 << 20))
        out: TextIO
        if compressed:  # mtime=0, no name in the header: identical tables give identical bytes
            gz = stack.enter_context(gzip_module.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0))
            out = stack.enter_context(io.TextIOWrapper(gz, encoding="utf-8", newline="\n"))
        else:
            out = stack.enter_context(io.TextIOWrapper(raw, encoding="utf-8", newline="\n"))
        out.write('{"type":"FeatureCollection","features":[\n')
        for i, poly in enumerate(iter_clean_polygons(table, stats)):
            nid = int(table.ids[i])
            measurements: dict[str, float | str] = {
                k: json_number(c[i]) for k, c in zip(names, columns, strict=True)
            }
            measurements["probability"] = json_number(table.probabilities[i])
            measurements["id"] = nid
            feature = {
                "type": "Feature",
                "id": feature_uuid(slide_key, nid),
                "geometry": _geometry(poly),
                "properties": {
                    "objectType": "detection",
                    "classification": classes[int(table.class_ids[i])],
                    "measurements": measurements,
                    "isLocked": False,
                },
            }
            if written:
                out.write(",\n")
            out.write(json.dumps(feature, allow_nan=False, separators=(",", ":")))
            written += 1
        out.write("\n]}\n")
    stats.log(f"GeoJSON {target.name}")
    return written
