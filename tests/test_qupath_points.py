"""QuPath point annotations: the variants QuPath writes (0.2 to 0.7), our writer, and real CRCHisto points.

The hand-written snippets follow what QuPath's source writes (see the module docstring of
``histoseg.datasets.qupath_points``); the default colours were computed with Java's own ``java.util.Random``.
"""

from __future__ import annotations

import gzip
import json
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest

from histoseg.datasets.crchisto import CRCHISTO_CLASSES, load_crchisto
from histoseg.datasets.qupath_points import (
    PointAnnotations,
    default_class_color,
    pixel_centres_to_qupath,
    qupath_to_pixel_centres,
    read_qupath_points,
    write_qupath_points,
)
from histoseg.errors import DatasetError, OutputError


def _write_json(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def _grouped(names: list[str | None]) -> np.ndarray:
    """Order in which the writer emits points: by class in first-seen order, stable within a class."""
    first: dict[str | None, int] = {}
    for n in names:
        first.setdefault(n, len(first))
    return np.argsort([first[n] for n in names], kind="stable")


# QuPath 0.4+: File > Export objects as GeoJSON, "Export as FeatureCollection" ticked; one points annotation
# per class (MultiPoint), a single click (Point), a locked one, a polygon annotation and a detection point.
QUPATH_04 = {
    "type": "FeatureCollection",
    "features": [
        {
            "type": "Feature",
            "id": "1b0c7a4e-8a1e-4a35-9d57-0f3f0d0f6b11",
            "geometry": {"type": "MultiPoint", "coordinates": [[10.5, 20.25], [30, 40], [55.75, 60.5]]},
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}},
        },
        {
            "type": "Feature",
            "id": "2c1d8b5f-9b2f-4b46-8e68-101f1e1f7c22",
            "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [100, 0], [100, 100], [0, 0]]]},
            "properties": {"objectType": "annotation", "classification": {"name": "Region*", "color": [0, 0, 180]}},
        },
        {
            "type": "Feature",
            "id": "3d2e9c60-ac30-4c57-9f79-212f2f2f8d33",
            "geometry": {"type": "Point", "coordinates": [70.25, 80]},
            "properties": {
                "objectType": "annotation",
                "classification": {"name": "Lymphocyte", "color": [160, 90, 160]},
                "isLocked": True,
            },
        },
        {
            "type": "Feature",
            "id": "4e3fad71-bd41-4d68-a08a-323f3f3f9e44",
            "geometry": {"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]},
            "properties": {"objectType": "annotation"},
        },
        {
            "type": "Feature",
            "id": "5f40be82-ce52-4e79-b19b-434040400f55",
            "geometry": {"type": "Point", "coordinates": [90, 91]},
            "properties": {
                "objectType": "detection",
                "classification": {"name": "Tumor", "color": [200, 0, 0]},
                "measurements": {"Area": 3.0},
            },
        },
    ],
}


def test_qupath_04_feature_collection(tmp_path: Path) -> None:
    pa = read_qupath_points(_write_json(tmp_path / "clicks.geojson", QUPATH_04))
    expected = [[10.5, 20.25], [30, 40], [55.75, 60.5], [70.25, 80], [1, 2], [3, 4], [90, 91]]
    np.testing.assert_array_equal(pa.points, np.array(expected, dtype=np.float64))
    assert pa.points.dtype == np.float64 and pa.class_index.dtype == np.int64
    assert pa.names == ("Tumor", "Lymphocyte")
    assert pa.colors == ((200, 0, 0), (160, 90, 160))
    np.testing.assert_array_equal(pa.class_index, [0, 0, 0, 1, -1, -1, 0])
    assert pa.ignored == 1  # the polygon
    assert pa.point_class_names()[3:5] == ["Lymphocyte", None]


def test_single_feature_point_unclassified_with_z(tmp_path: Path) -> None:
    doc = {"type": "Feature", "id": "PathAnnotationObject", "geometry": {"type": "Point", "coordinates": [5, 6, 0]}}
    pa = read_qupath_points(_write_json(tmp_path / "one.json", doc))
    np.testing.assert_array_equal(pa.points, [[5.0, 6.0]])
    np.testing.assert_array_equal(pa.class_index, [-1])
    assert pa.names == () and pa.colors == () and pa.ignored == 0


def test_old_versions_list_colorrgb_and_parent_class(tmp_path: Path) -> None:
    # QuPath 0.2 (type in "id", isLocked always) and 0.3 ("object_type"), written as a bare list of features;
    # classification serialised by Gson with the signed ARGB int "colorRGB" and "parentClass" for derived classes.
    doc = [
        {
            "type": "Feature",
            "id": "PathAnnotationObject",
            "geometry": {"type": "MultiPoint", "coordinates": [[1.5, 2.5], [3.5, 4.5]]},
            "properties": {"classification": {"name": "Tumor", "colorRGB": -3670016}, "isLocked": False},
        },
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [7, 8]},
            "properties": {
                "object_type": "annotation",
                "classification": {
                    "parentClass": {"name": "Tumor", "colorRGB": -3670016},
                    "name": "Positive",
                    "colorRGB": -14336,
                },  # fmt: skip
                "isLocked": False,
            },
        },
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [9, 9]}, "properties": {"classification": {}}},
    ]
    pa = read_qupath_points(_write_json(tmp_path / "old.json", doc))
    assert pa.names == ("Tumor", "Tumor: Positive")
    assert pa.colors == ((200, 0, 0), (255, 200, 0))  # -3670016 = 0xFFC80000, -14336 = 0xFFFFC800
    np.testing.assert_array_equal(pa.class_index, [0, 0, 1, -1])


def test_names_string_alpha_and_default_colours(tmp_path: Path) -> None:
    def feat(x: float, cls: object) -> dict[str, object]:
        return {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [x, 0]},
            "properties": {"classification": cls},
        }

    doc = [
        feat(0, {"names": ["Tumor", "Positive"], "color": [10, 20, 30]}),
        feat(1, {"name": "Stroma", "color": [1, 2, 3, 128]}),
        feat(2, "epithelial"),  # a bare string: QuPath accepts it, the colour is QuPath's default for the name
        feat(3, {"name": "epithelial", "color": [9, 9, 9]}),  # first colour seen wins
        feat(4, "c192"),
    ]
    pa = read_qupath_points(_write_json(tmp_path / "mixed.geojson", doc))
    assert pa.names == ("Tumor: Positive", "Stroma", "epithelial", "c192")
    assert pa.colors == ((10, 20, 30), (1, 2, 3), (14, 164, 28), (8, 208, 32))
    np.testing.assert_array_equal(pa.class_index, [0, 1, 2, 2, 3])


def test_default_colour_matches_java() -> None:
    # values printed by java.util.Random(name.hashCode()) with QuPath's loop (JDK 17)
    java = {
        "epithelial": (14, 164, 28),
        "fibroblast": (227, 3, 24),
        "inflammatory": (49, 71, 21),
        "others": (74, 214, 46),
        "Lymphocyte": (196, 65, 127),
        "Ünïcode": (74, 152, 183),
        "a": (184, 237, 175),
        "c192": (8, 208, 32),  # the first draw is too dark and is redrawn
    }
    for name, rgb in java.items():
        assert default_class_color(name) == rgb, name


def test_round_trip_gzip_zip_and_determinism(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    pts = rng.uniform(0, 5000, size=(40, 2))
    pts[0] = [1e-7, 123456.789012345]
    names: list[str | None] = [["A", "B", None, "Cé"][i] for i in rng.integers(0, 4, 40)]
    names[7] = "Solo"
    n = write_qupath_points(tmp_path / "p.geojson", pts, names, colors={"A": (1, 2, 3)})
    assert n == 40
    pa = read_qupath_points(tmp_path / "p.geojson")
    order = _grouped(names)
    np.testing.assert_array_equal(pa.points, pts[order])  # exact: full precision is written
    assert pa.point_class_names() == [names[i] for i in order]
    assert dict(zip(pa.names, pa.colors, strict=True))["A"] == (1, 2, 3)
    assert dict(zip(pa.names, pa.colors, strict=True))["B"] == default_class_color("B")
    doc = json.loads((tmp_path / "p.geojson").read_text())
    assert [
        f["geometry"]["type"]
        for f in doc["features"]
        if f["properties"].get("classification", {}).get("name") == "Solo"
    ] == ["Point"]

    write_qupath_points(tmp_path / "q.geojson", pts, names, colors={"A": (1, 2, 3)})
    assert (tmp_path / "p.geojson").read_bytes() == (tmp_path / "q.geojson").read_bytes()
    write_qupath_points(tmp_path / "p.geojson.gz", pts, names, colors={"A": (1, 2, 3)}, locked=True)
    assert gzip.decompress((tmp_path / "p.geojson.gz").read_bytes()).startswith(b'{"type":"FeatureCollection"')
    gz = read_qupath_points(tmp_path / "p.geojson.gz")
    np.testing.assert_array_equal(gz.points, pa.points)
    feats = json.loads(gzip.decompress((tmp_path / "p.geojson.gz").read_bytes()))["features"]
    assert all(f["properties"]["isLocked"] is True for f in feats)
    with zipfile.ZipFile(tmp_path / "p.zip", "w") as zf:  # QuPath's .zip export: one <stem>.geojson entry
        zf.writestr("p.geojson", (tmp_path / "q.geojson").read_text())
    np.testing.assert_array_equal(read_qupath_points(tmp_path / "p.zip").points, pa.points)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.geojson", "p.geojson.gz", "p.zip", "q.geojson"]


def test_subset_and_coordinate_helpers() -> None:
    pa = PointAnnotations(np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), np.array([0, -1, 1]), ("a", "b"),
                          ((1, 1, 1), (2, 2, 2)))  # fmt: skip
    sub = pa.subset(pa.class_index >= 0)
    np.testing.assert_array_equal(sub.points, [[1.0, 2.0], [5.0, 6.0]])
    np.testing.assert_array_equal(sub.class_index, [0, 1])
    assert sub.names == pa.names and sub.colors == pa.colors
    assert len(pa.subset(np.array([2]))) == 1
    with pytest.raises(ValueError):
        pa.subset(np.array([True, False]))
    np.testing.assert_array_equal(qupath_to_pixel_centres(np.array([[0.5, 10.5]])), [[0.0, 10.0]])
    np.testing.assert_array_equal(pixel_centres_to_qupath(qupath_to_pixel_centres(pa.points)), pa.points)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not JSON"),
        ('{"type": "FeatureCollection", "features": []}', "no Point or MultiPoint"),
        (json.dumps([QUPATH_04["features"][1]]), "no Point or MultiPoint"),
        ('{"type": "Feature", "geometry": {"type": "Point", "coordinates": ["1", 2]}}', "non-numeric"),
        ('{"type": "Feature", "geometry": {"type": "Point", "coordinates": [true, 2]}}', "non-numeric"),
        ('{"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[1, 2], [NaN, 2]]}}', "non-finite"),
        ('{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1e999, 2]}}', "non-finite"),
        ('{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1]}}', "[x, y]"),
        ('{"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": 5}}', "must be a list"),
        ('[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}, 3]', "not a JSON object"),
        (
            '{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, '
            '"properties": {"classification": 7}}',
            "classification",
        ),
        ('"just a string"', "not a GeoJSON"),
    ],
)
def test_bad_input_raises_one_line_dataset_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.geojson"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError) as err:
        read_qupath_points(path)
    text = str(err.value)
    assert message in text and "bad.geojson" in text and "\n" not in text


def test_missing_and_corrupt_gzip(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        read_qupath_points(tmp_path / "absent.geojson")
    (tmp_path / "x.geojson.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DatasetError, match="x.geojson.gz"):
        read_qupath_points(tmp_path / "x.geojson.gz")


def test_writer_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_qupath_points(tmp_path / "a.geojson", np.zeros((2, 2)), ["a"])
    with pytest.raises(ValueError):
        write_qupath_points(tmp_path / "a.geojson", np.array([[np.nan, 1.0]]), ["a"])
    with pytest.raises(ValueError):
        write_qupath_points(tmp_path / "a.geojson", np.zeros((1, 2)), ["a"], colors={"a": (300, 0, 0)})
    (tmp_path / "dir.geojson").mkdir()
    with pytest.raises(OutputError):
        write_qupath_points(tmp_path / "dir.geojson", np.zeros((1, 2)), ["a"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.geojson"]  # no temporary left behind


def test_crchisto_points_round_trip_with_qupath_structure(shared_data: Path, tmp_path: Path) -> None:
    samples = load_crchisto("train", None)
    total = 0
    for s in samples:
        assert s.points is not None and s.point_classes is not None
        names = [CRCHISTO_CLASSES[c - 1] if c > 0 else None for c in s.point_classes.tolist()]
        path = tmp_path / f"{s.name}.geojson"
        assert write_qupath_points(path, s.points, names) == len(s.points)
        pa = read_qupath_points(path)
        order = _grouped(names)
        np.testing.assert_array_equal(pa.points, s.points[order])
        assert pa.point_class_names() == [names[i] for i in order]
        total += len(pa)

        # structure as QuPath's PathObjectTypeAdapter / PathClassTypeAdapter / GeometryTools write it
        doc = json.loads(path.read_text(encoding="utf-8"))
        assert list(doc) == ["type", "features"] and doc["type"] == "FeatureCollection"
        seen = []
        for f in doc["features"]:
            assert list(f) == ["type", "id", "geometry", "properties"] and f["type"] == "Feature"
            assert str(uuid.UUID(f["id"])) == f["id"]
            n = len(f["geometry"]["coordinates"]) if f["geometry"]["type"] == "MultiPoint" else 1
            assert f["geometry"]["type"] == ("Point" if n == 1 else "MultiPoint")
            props = f["properties"]
            assert props["objectType"] == "annotation" and set(props) <= {"objectType", "classification"}
            cls = props.get("classification")
            if cls is not None:
                assert list(cls) == ["name", "color"] and cls["name"] in CRCHISTO_CLASSES
                assert len(cls["color"]) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in cls["color"])
            seen.append(None if cls is None else cls["name"])
        assert len(seen) == len(set(seen)) == len(set(names))  # one feature per class
    assert total > 10000  # CRCHisto train holds ~20k nuclei: the real data were read, not a stub
