"""The GeoJSON export's bulk text (``export.geojson_text``) is byte for byte what ``json.dumps`` and ``uuid.uuid5``
give: numbers, coordinates, ids and whole files, checked against those references."""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely

from histoseg.export import GeoJSONWriter, RepairStats, feature_uuid
from histoseg.export.geojson import NUCLEUS_NAMESPACE, qupath_name
from histoseg.export.geojson_text import PLAIN_LIMIT, coordinate_texts, decimal_chars, feature_ids
from histoseg.export.geometry import clean_polygons
from histoseg.types import InstanceTable

from .test_export import _make_table


def _texts(values: np.ndarray) -> list[str]:
    return [bytes(row[row > 0]).decode("ascii") for row in decimal_chars(values)]


def test_numbers_read_as_float_repr() -> None:
    rng = np.random.default_rng(0)
    edge = [0.0, -0.0, 0.5, -0.5, 0.01, -0.01, 0.1, 0.05, 1.0, 9.99, 10.0, 99.99, 100.0, 12345678.9,
            9999999999999.99, 1e12 + 0.25]
    values = np.round(np.concatenate([
        rng.uniform(-1e5, 1e6, 100_000), rng.integers(-300, 300_000, 5000) / 4, rng.integers(0, 10**9, 5000) / 100,
        rng.integers(10**14, 10**15, 5000) / 100,  # up to the limit: 15 significant digits
        edge,
    ]), 2)  # fmt: skip
    assert _texts(values) == [float.__repr__(v) for v in values.tolist()]
    assert _texts(np.array([-0.0])) == ["-0.0"]  # the sign of a coordinate rounded to zero is kept, as repr keeps it
    assert decimal_chars(np.zeros(0)).shape[0] == 0
    with pytest.raises(ValueError, match="not JSON compliant"):  # json.dumps(allow_nan=False)'s refusal
        decimal_chars(np.array([1.0, math.nan]))
    with pytest.raises(ValueError, match="plain notation"):
        decimal_chars(np.array([PLAIN_LIMIT]))


def test_coordinates_equal_json_dumps_of_the_rings() -> None:
    holed = shapely.Polygon([(0, 0), (10.005, 0), (10, 10), (0, 10)],
                            [[(2, 2), (4, 2), (4, 4), (2, 4)], [(6, 6), (8, 6), (8, 8)]])  # fmt: skip
    negative = shapely.Polygon([(-3.333, -0.001), (5.5, -2.0), (1.25, 7.777)])
    rng = np.random.default_rng(1)
    blobs = [shapely.Point(x, y).buffer(r, quad_segs=8) for x, y, r in rng.uniform([0, 0, 2], [9e4, 9e4, 9], (300, 3))]
    far = shapely.Polygon([(1e14 + 0.25, 3.0), (1e14 + 9.0, 3.0), (1e14 + 9.0, 8.5)])  # beyond PLAIN_LIMIT
    polys = [holed, negative, *blobs]

    def reference(p: shapely.Polygon) -> str:
        rings = [np.round(np.asarray(r.coords), 2).tolist() for r in [p.exterior, *p.interiors]]
        return json.dumps(rings, allow_nan=False, separators=(",", ":"))

    got = coordinate_texts(polys)
    assert got == [reference(p) for p in polys]
    assert got[1].startswith("[[[-3.33,-0.0],")  # a vertex rounded to -0.0 keeps its sign, as json.dumps writes it
    assert coordinate_texts([]) == []
    assert coordinate_texts([far, holed]) == [reference(far), reference(holed)]  # each number through repr there


def test_ids_equal_uuid5() -> None:
    for key in ("slide-abc", "a/b c", "ünïcode 切片"):
        numbers = [0, 1, 9, 10, 99, 123456, 2**32 - 1, 2**40]
        want = [str(uuid.uuid5(NUCLEUS_NAMESPACE, f"{key}/{n}")) for n in numbers]
        assert feature_ids(NUCLEUS_NAMESPACE, f"{key}/", numbers) == want
        assert [feature_uuid(key, n) for n in numbers] == want


def _reference_file(table: InstanceTable, slide_key: str, bands: list[np.ndarray]) -> str:
    """The file as the writer wrote it before the bulk text: ``json.dumps`` of each feature's dict."""
    features = []
    for rows in bands:
        part = table.take(rows)
        polys = clean_polygons(part, RepairStats())
        for i, poly in enumerate(polys):
            measurements: dict[str, Any] = {}
            for name, col in part.measurements.items():
                if name in ("probability", "id"):
                    continue
                if math.isfinite(float(col[i])):
                    measurements[qupath_name(name)] = float(col[i])
            if math.isfinite(float(part.probabilities[i])):
                measurements[qupath_name("probability")] = float(part.probabilities[i])
            measurements[qupath_name("id")] = int(part.ids[i])
            props: dict[str, Any] = {"objectType": "detection"}
            c = int(part.class_ids[i])
            if c:
                props["classification"] = {"name": part.class_name(c), "color": list(part.class_color(c))}
            props["measurements"] = measurements
            props["isLocked"] = False
            rings = [np.round(np.asarray(r.coords), 2).tolist() for r in [poly.exterior, *poly.interiors]]
            feature = {
                "type": "Feature",
                "id": str(uuid.uuid5(NUCLEUS_NAMESPACE, f"{slide_key}/{int(part.ids[i])}")),
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": props,
            }
            features.append(json.dumps(feature, allow_nan=False, separators=(",", ":")))
    return '{"type":"FeatureCollection","features":[\n' + ",\n".join(features) + "\n]}\n"


def test_the_file_equals_json_dumps_of_each_feature(tmp_path: Path) -> None:
    """Unclassified and classified nuclei, NaN and inf measurements, a bow-tie and a degenerate outline (the
    repairs), a non-ASCII measurement name, written as three bands and as one."""
    table = _make_table()
    classes = table.class_ids.copy()
    classes[[1, 6]] = 0  # unclassified: no classification object
    probabilities = table.probabilities.copy()
    probabilities[2] = np.nan
    table = replace(table, class_ids=classes, probabilities=probabilities)
    assert "µ" in qupath_name("area_um2")  # json.dumps writes it as \u00b5
    n = len(table)
    for bands in ([np.arange(n)], [np.arange(3), np.arange(3, 3), np.arange(3, n)]):
        path = tmp_path / f"s{len(bands)}.geojson"
        with GeoJSONWriter(path, slide_key="slide ü") as writer:
            for rows in bands:
                writer.write(table.take(rows))
        assert writer.written == n
        assert path.read_text(encoding="utf-8") == _reference_file(table, "slide ü", bands)
