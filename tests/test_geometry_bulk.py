"""The export's bulk geometry paths give exactly what the one-polygon-at-a-time paths give.

``geometry.clean_polygons`` takes the common case (a ring valid once rounded) for all nuclei at once, and the
GeoJSON writer formats every polygon's rings in one pass (``geojson_text.coordinate_texts``). Both exist for speed only
(issue 13: the client exports beside the workers), so they must not change a vertex: checked here on real
nucleus outlines (separated from a synthetic label image by the project's own measuring code) with noise below
the export grid, plus the rings that need the slow path (bow-tie, too few points, NaN, collapse on rounding).
"""

from __future__ import annotations

import json

import numpy as np
import shapely
from skimage import draw, measure

from histoseg.export.geojson_text import coordinate_texts
from histoseg.export.geometry import RepairStats, clean_polygon, clean_polygons


class _Rings:
    """The two fields of an InstanceTable that polygon cleaning reads."""

    def __init__(self, polygons: list[np.ndarray]) -> None:
        self.polygons = polygons
        self.bboxes = [np.array([*np.nanmin(p, 0), *np.nanmax(p, 0)]) if np.isfinite(p).any() else np.full(4, np.nan)
                       for p in polygons]

    def __len__(self) -> int:
        return len(self.polygons)


def _outlines(n: int, seed: int) -> list[np.ndarray]:
    """``n`` nucleus-like outlines (ellipses, some touching), as the exporters receive them: level-0 (x, y),
    no closing vertex, with sub-grid noise so that rounding matters."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = np.zeros((40, 40), np.uint8)
        rr, cc = draw.ellipse(20, 20, rng.uniform(3, 12), rng.uniform(3, 12), rotation=rng.uniform(0, np.pi))
        img[rr, cc] = 1
        ring = measure.find_contours(img, 0.5)[0][:-1, ::-1] * 2.0 + rng.uniform(0, 5000, 2)
        out.append(ring + rng.uniform(-0.004, 0.004, ring.shape))
    return out


HARD = [
    np.array([[0, 0], [10, 10], [10, 0], [0, 10]], float),  # bow-tie: repaired
    np.array([[0, 0], [1, 1]], float),  # two points: bounding box
    np.array([[0, 0], [np.nan, 1], [2, 2], [3, 0]]),  # a NaN vertex: dropped one by one
    np.array([[0, 0], [0.001, 0.001], [0.002, 0]]),  # collapses on the 2-decimal grid
    np.array([[0, 0], [5, 0], [0, 0]], float),  # closes on its third point
    np.array([[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]], float),  # closing vertex given
    np.array([[0, 0], [0, 4], [4, 4], [4, 0]], float),  # clockwise: reoriented
]


def test_bulk_cleaning_equals_one_by_one() -> None:
    rings = _outlines(300, seed=1) + HARD + _outlines(20, seed=2)
    table = _Rings(rings)
    one, bulk = RepairStats(), RepairStats()
    want = [clean_polygon(c, b, one) for c, b in zip(table.polygons, table.bboxes, strict=True)]
    got = clean_polygons(table, bulk)  # type: ignore[arg-type]
    assert [g.wkb for g in got] == [w.wkb for w in want]
    assert (bulk.repaired, bulk.bbox_fallback) == (one.repaired, one.bbox_fallback)
    assert one.repaired >= 1 and one.bbox_fallback >= 2  # the hard rings did take the slow path
    assert all(shapely.is_valid(g) and shapely.is_ccw(g.exterior) for g in got)


def test_bulk_geojson_rings_equal_one_by_one() -> None:
    polys = clean_polygons(_Rings(_outlines(200, seed=3) + HARD))  # type: ignore[arg-type]
    holed = shapely.Polygon([(0, 0), (10, 0), (10, 10), (0, 10)], [[(2, 2), (4, 2), (4, 4), (2, 4)],
                                                                   [(6, 6), (8, 6), (8, 8)]])
    polys = [polys[0], holed, *polys[1:]]

    def one(poly: shapely.Polygon) -> dict[str, object]:
        rings = [poly.exterior, *poly.interiors]
        return {"type": "Polygon", "coordinates": [np.round(np.asarray(r.coords), 2).tolist() for r in rings]}

    want = [json.dumps(one(p)["coordinates"], separators=(",", ":")) for p in polys]
    got = coordinate_texts(polys)
    assert got == want
    assert len(json.loads(got[1])) == 3  # the exterior and both holes, in order
    assert coordinate_texts([]) == []
