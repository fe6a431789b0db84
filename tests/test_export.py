"""Exporters: QuPath GeoJSON rules, exact pulled label raster, Parquet table, atomic writes."""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
import zarr
from shapely.geometry import Polygon, shape
from skimage import draw, measure

from histoseg.errors import OutputError
from histoseg.export import (
    SlideImage,
    atomic_dir,
    atomic_file,
    feature_uuid,
    pyramid_shapes,
    qupath_name,
    write_geojson,
    write_label_zarr,
    write_parquet,
    write_provenance,
    write_success,
)
from histoseg.types import InstanceTable, PlaneInfo

PLANE = (150, 200)  # (H, W) processing plane
SCALE = 2.0  # level-0 px per plane px
MPP0 = 0.25
CHUNK = 64
BOWTIE, DEGENERATE = 3, 5  # table rows whose polygons are replaced by broken ones
NAN_ROW = 2


def _reject_constant(token: str) -> Any:
    raise AssertionError(f"bare JSON constant {token} in output")


def _strict_loads(text: str) -> Any:
    return json.loads(text, parse_constant=_reject_constant)


def _make_table() -> InstanceTable:
    """Ellipses over a 150 x 200 plane, several crossing the 64-px chunk grid, two overlapping."""
    specs = [  # (centre y, centre x, radius y, radius x, class)
        (64, 64, 9, 12, 1),  # straddles a chunk corner
        (30, 127, 7, 10, 2),  # straddles x = 128
        (100, 40, 12, 8, 1),
        (128, 150, 10, 10, 2),  # straddles y = 128 (bow-tie polygon)
        (70, 72, 8, 8, 2),  # overlaps the first one
        (20, 20, 5, 5, 1),  # (degenerate polygon)
        (140, 190, 6, 6, 1),  # touches the plane corner area
        (100, 100, 15, 20, 2),
    ]
    ids = np.array([7, 2, 8, 1, 5, 3, 6, 4], dtype=np.uint32)  # rows 0/4 overlap: id order != row order
    masks, offsets, polys, cents, bboxes, anchors, rows = [], [], [], [], [], [], []
    mpp = MPP0 * SCALE
    for cy, cx, ry, rx, _ in specs:
        oy, ox = cy - ry - 1, cx - rx - 1
        oy, ox = max(oy, 0), max(ox, 0)
        h = min(2 * ry + 3, PLANE[0] - oy)
        w = min(2 * rx + 3, PLANE[1] - ox)
        mask = np.zeros((h, w), bool)
        rr, cc = draw.ellipse(cy - oy, cx - ox, ry, rx, shape=mask.shape)
        mask[rr, cc] = True
        contour = max(measure.find_contours(np.pad(mask, 1).astype(float), 0.5), key=len)
        ring = (contour[:-1, ::-1] - 1 + [ox, oy] + 0.5) * SCALE  # (x, y) level-0, open ring
        ys, xs = np.nonzero(mask)
        centroid = np.array([(xs.mean() + ox + 0.5) * SCALE, (ys.mean() + oy + 0.5) * SCALE])
        props = measure.regionprops(mask.astype(np.uint8))[0]
        masks.append(mask)
        offsets.append((oy, ox))
        polys.append(ring)
        cents.append(centroid)
        anchors.append((int(ys.mean() + oy), int(xs.mean() + ox)))
        bboxes.append([(xs.min() + ox) * SCALE, (ys.min() + oy) * SCALE, (xs.max() + ox + 1) * SCALE,
                       (ys.max() + oy + 1) * SCALE])  # fmt: skip
        rows.append([mask.sum() * mpp**2, props.perimeter * mpp, props.eccentricity, props.solidity, 0.4])
    names = ("area_um2", "perimeter_um", "eccentricity", "solidity", "mean_hematoxylin")
    meas = dict(zip(names, np.array(rows, np.float64).T.copy(), strict=True))
    meas["mean_hematoxylin"][NAN_ROW] = math.nan
    meas["solidity"][NAN_ROW] = math.inf
    x0, y0 = bboxes[BOWTIE][:2]
    polys[BOWTIE] = np.array([[x0, y0], [x0 + 20, y0 + 20], [x0 + 20, y0], [x0, y0 + 20]])  # self-crossing
    polys[DEGENERATE] = np.array([[40.0, 40.0], [50.0, 50.0]])  # 2 vertices
    return InstanceTable(
        ids=ids,
        anchors=np.array(anchors, np.int64),
        centroids=np.array(cents, np.float64),
        bboxes=np.array(bboxes, np.float64),
        class_ids=np.array([s[4] for s in specs], np.uint8),
        probabilities=np.linspace(0.6, 0.95, len(specs)).astype(np.float32),
        polygons=polys,
        masks=masks,
        mask_offsets=np.array(offsets, np.int64),
        measurements=meas,
        # class names as the model card lists them: class id k is entry k - 1
        plane=PlaneInfo(("tumor", "lymphocyte"), ((200, 0, 0), (0, 0, 220)), MPP0, SCALE, PLANE),
    )


@pytest.fixture(scope="module")
def table() -> InstanceTable:
    return _make_table()


def _zarr_array(store: Path, name: str) -> zarr.Array:
    arr = zarr.open_group(str(store), mode="r")[name]
    assert isinstance(arr, zarr.Array)
    return arr


def _reference_raster(table: InstanceTable) -> tuple[np.ndarray, np.ndarray]:
    lab = np.zeros(table.plane_shape, np.uint32)
    cls = np.zeros(table.plane_shape, np.uint8)
    for i in np.argsort(table.ids, kind="stable"):
        (oy, ox), m = table.mask_offsets[i], table.masks[i]
        lab[oy : oy + m.shape[0], ox : ox + m.shape[1]][m] = table.ids[i]
        cls[oy : oy + m.shape[0], ox : ox + m.shape[1]][m] = table.class_ids[i]
    return lab, cls


def check_qupath_feature(f: dict[str, Any], table: InstanceTable) -> Polygon:
    """QuPath's GeoJSON import rules for one detection (facts.md), plus our naming and class mapping."""
    assert f["type"] == "Feature"
    uuid.UUID(f["id"])
    geom = f["geometry"]
    assert geom["type"] == "Polygon"
    for ring in geom["coordinates"]:
        assert ring[0] == ring[-1], "ring not closed"
        assert len({tuple(p) for p in ring}) >= 3
        assert all(round(v, 2) == v for p in ring for v in p)
    poly = shape(geom)
    assert isinstance(poly, Polygon) and poly.is_valid and poly.area > 0
    props = f["properties"]
    assert props["objectType"] == "detection"
    cls = props["classification"]
    assert set(cls) == {"name", "color"}  # a name without a colour aborts QuPath's import
    assert cls["name"] in table.class_names
    assert len(cls["color"]) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in cls["color"])
    meas = props["measurements"]
    assert isinstance(meas, dict)
    assert set(meas) <= {qupath_name(k) for k in (*table.measurements, "probability", "id")}
    assert qupath_name("id") in meas and "id" not in meas and "area_um2" not in meas
    # numbers only: no "NaN"/"Infinity" strings (older QuPath rejects them) and no bare NaN tokens
    assert all(type(v) in (int, float) and math.isfinite(v) for v in meas.values())
    assert props["isLocked"] is False
    return poly


def test_geojson_follows_qupath_rules(
    table: InstanceTable, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "s.geojson"
    with caplog.at_level(logging.WARNING, logger="histoseg.export"):
        n = write_geojson(table, out, slide_key="slide-abc")
    assert n == len(table)
    assert "1 invalid polygon(s) repaired, 1 replaced by their bounding box" in caplog.text
    doc = _strict_loads(out.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == n
    polys = [check_qupath_feature(f, table) for f in doc["features"]]
    for i, f in enumerate(doc["features"]):
        meas = f["properties"]["measurements"]
        assert meas["Nucleus ID"] == int(table.ids[i])
        assert f["id"] == feature_uuid("slide-abc", int(table.ids[i]))
        cid = int(table.class_ids[i])  # 1-based: class 1 is the card's first class
        assert f["properties"]["classification"] == {
            "name": ("tumor", "lymphocyte")[cid - 1],
            "color": [[200, 0, 0], [0, 0, 220]][cid - 1],
        }
        assert meas["Detection probability"] == pytest.approx(float(table.probabilities[i]))
        assert meas["Nucleus: Area µm^2"] == pytest.approx(float(table.measurements["area_um2"][i]))
    nan_meas = doc["features"][NAN_ROW]["properties"]["measurements"]
    # non-finite values are left out of that feature only
    assert "Nucleus: Hematoxylin OD mean" not in nan_meas and "Nucleus: Solidity" not in nan_meas
    assert "Nucleus: Eccentricity" in nan_meas
    assert "Nucleus: Solidity" in doc["features"][0]["properties"]["measurements"]
    # bow-tie: largest part of make_valid (one triangle of the two); degenerate: its bbox rectangle
    assert polys[BOWTIE].area == pytest.approx(100.0)
    x0, y0, x1, y1 = table.bboxes[DEGENERATE]
    assert polys[DEGENERATE].equals(shapely.box(x0, y0, x1, y1))
    # well-formed polygons stay close to their source (level-0 coordinates, not plane ones)
    assert polys[0].intersection(Polygon(table.polygons[0])).area / polys[0].area > 0.99
    assert polys[0].contains(shapely.Point(table.centroids[0]))


def test_geojson_deterministic_and_gzip(table: InstanceTable, tmp_path: Path) -> None:
    a, b = tmp_path / "a.geojson", tmp_path / "b.geojson"
    write_geojson(table, a, slide_key="k")
    write_geojson(table, b, slide_key="k")
    assert a.read_bytes() == b.read_bytes()
    n = write_geojson(table, tmp_path / "c.geojson", slide_key="k", gzip=True)
    gz = tmp_path / "c.geojson.gz"
    assert n == len(table) and gz.is_file() and not (tmp_path / "c.geojson").exists()
    with gzip.open(gz, "rt", encoding="utf-8") as fh:
        assert fh.read() == a.read_text()
    write_geojson(table, tmp_path / "d.geojson.gz", slide_key="k", gzip=True)
    assert (tmp_path / "d.geojson.gz").read_bytes() == gz.read_bytes()  # byte-identical reruns
    first = _strict_loads(b.read_text())["features"][0]["id"]
    assert first == feature_uuid("k", int(table.ids[0])) != feature_uuid("other-slide", int(table.ids[0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.geojson", "b.geojson", "c.geojson.gz",
                                                          "d.geojson.gz"]  # fmt: skip


def test_label_zarr_equals_direct_raster(table: InstanceTable, tmp_path: Path) -> None:
    # instances must cross the chunk grid for this test to mean anything
    crossing = [
        any((o // CHUNK) != ((o + s - 1) // CHUNK) for o, s in zip(off, m.shape, strict=True))
        for off, m in zip(table.mask_offsets, table.masks, strict=True)
    ]
    assert sum(crossing) >= 3
    out = tmp_path / "s.zarr"
    write_label_zarr(table, out, image=None, chunk=CHUNK)
    ref_lab, ref_cls = _reference_raster(table)
    shapes = pyramid_shapes(PLANE, CHUNK)
    assert shapes == [(150, 200), (75, 100), (38, 50)]
    for k, shp in enumerate(shapes):
        nuc, cls = _zarr_array(out, f"labels/nuclei/{k}"), _zarr_array(out, f"labels/classes/{k}")
        assert nuc.shape == shp and cls.shape == shp
        assert nuc.dtype == np.uint32 and cls.dtype == np.uint8
        np.testing.assert_array_equal(np.asarray(nuc[:]), ref_lab[:: 2**k, :: 2**k])
        np.testing.assert_array_equal(np.asarray(cls[:]), ref_cls[:: 2**k, :: 2**k])
    assert set(np.unique(ref_lab)) - {0} == set(table.ids.tolist())  # overlap is partial: all ids show
    # rows 0 (id 7) and 4 (id 5) overlap: the larger id wins although its row comes first
    both = np.zeros(PLANE, np.int8)
    for i in (0, 4):
        (oy, ox), m = table.mask_offsets[i], table.masks[i]
        both[oy : oy + m.shape[0], ox : ox + m.shape[1]] += m
    level0 = np.asarray(_zarr_array(out, "labels/nuclei/0")[:])
    assert (both == 2).sum() > 10 and set(np.unique(level0[both == 2]).tolist()) == {7}


def test_label_zarr_metadata(table: InstanceTable, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    write_label_zarr(table, out, image=None, chunk=CHUNK)
    assert json.loads((out / "labels" / ".zattrs").read_text())["labels"] == ["nuclei", "classes"]
    mpp = MPP0 * SCALE
    for name in ("nuclei", "classes"):
        attrs = json.loads((out / "labels" / name / ".zattrs").read_text())
        (ms,) = attrs["multiscales"]
        assert ms["version"] == "0.4"
        axes = [(a["name"], a["type"], a["unit"]) for a in ms["axes"]]
        assert axes == [("y", "space", "micrometer"), ("x", "space", "micrometer")]
        assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]
        for k, d in enumerate(ms["datasets"]):
            (tr,) = d["coordinateTransformations"]
            assert tr["type"] == "scale" and tr["scale"] == pytest.approx([mpp * 2**k] * 2)
        assert attrs["image-label"]["version"] == "0.4"
        zarray = json.loads((out / "labels" / name / "0" / ".zarray").read_text())
        assert zarray["zarr_format"] == 2 and zarray["dimension_separator"] == "/"
        assert (zarray["compressor"]["id"], zarray["compressor"]["level"]) == ("zstd", 3)
        assert zarray["chunks"] == [CHUNK, CHUNK]
    label = json.loads((out / "labels" / "classes" / ".zattrs").read_text())["image-label"]
    colors = {c["label-value"]: c["rgba"] for c in label["colors"]}
    assert colors == {0: [0, 0, 0, 0], 1: [200, 0, 0, 255], 2: [0, 0, 220, 255]}  # every value present
    names = {p["label-value"]: p["name"] for p in label["properties"]}
    assert names == {0: "background", 1: "tumor", 2: "lymphocyte"}
    nuclei = json.loads((out / "labels" / "nuclei" / ".zattrs").read_text())["image-label"]
    assert nuclei["colors"] == [{"label-value": 0, "rgba": [0, 0, 0, 0]}]
    # empty chunks are not stored; default pyramid depth for a big chunk is one level
    assert not (out / "labels" / "nuclei" / "0" / "0" / "3").exists()
    assert pyramid_shapes((4096, 3000), 1024) == [(4096, 3000), (2048, 1500), (1024, 750)]
    assert pyramid_shapes((100, 100), 1024) == [(100, 100)]
    assert len(pyramid_shapes((100, 100), 1024, levels=3)) == 3


def test_label_zarr_replaces_existing_atomically(table: InstanceTable, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    write_label_zarr(table, out, image=None, chunk=CHUNK, levels=1)
    (out / "stale.txt").write_text("old")
    write_label_zarr(table, out, image=None, chunk=CHUNK, levels=2)
    assert not (out / "stale.txt").exists() and (out / "labels" / "nuclei" / "1").is_dir()
    bad = InstanceTable(**{**table.__dict__, "ids": np.zeros(len(table), np.uint32)})
    with pytest.raises(ValueError, match="stitched ids"):
        write_label_zarr(bad, out, image=None, chunk=CHUNK)
    assert (out / "labels" / "nuclei" / "1").is_dir()  # previous output untouched
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]


def test_parquet_columns_and_wkb(table: InstanceTable, tmp_path: Path) -> None:
    pq_path, gj_path = tmp_path / "s.nuclei.parquet", tmp_path / "s.geojson"
    write_parquet(table, pq_path)
    write_geojson(table, gj_path, slide_key="k")
    t = pq.read_table(pq_path)
    fixed = ["id", "centroid_x", "centroid_y", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1", "class_id",
             "class_name", "probability"]  # fmt: skip
    assert t.column_names == fixed + list(table.measurements) + ["polygon"]
    assert t.num_rows == len(table)
    d = t.to_pydict()
    assert d["id"] == table.ids.tolist()
    assert d["class_name"] == [("tumor", "lymphocyte")[c - 1] for c in table.class_ids]
    np.testing.assert_allclose(d["centroid_x"], table.centroids[:, 0])
    np.testing.assert_allclose(d["bbox_y1"], table.bboxes[:, 3])
    assert math.isnan(d["mean_hematoxylin"][NAN_ROW]) and d["solidity"][NAN_ROW] == math.inf
    assert json.loads(t.schema.metadata[b"histoseg"])["qupath_names"]["area_um2"] == "Nucleus: Area µm^2"
    meta = json.loads(t.schema.metadata[b"histoseg"])
    assert meta["mpp0"] == MPP0 and meta["scale"] == SCALE and meta["mpp"] == MPP0 * SCALE
    assert meta["class_names"] == list(table.class_names)
    assert meta["class_colors"] == [list(c) for c in table.class_colors]
    assert json.loads(t.schema.metadata[b"geo"])["primary_column"] == "polygon"
    polys = shapely.from_wkb(d["polygon"])
    features = _strict_loads(gj_path.read_text())["features"]
    for poly, f in zip(polys, features, strict=True):
        assert poly.is_valid and poly.equals_exact(shape(f["geometry"]), 0.0)


def test_id_sets_agree(table: InstanceTable, tmp_path: Path) -> None:
    write_label_zarr(table, tmp_path / "s.zarr", image=None, chunk=CHUNK)
    write_parquet(table, tmp_path / "s.parquet")
    write_geojson(table, tmp_path / "s.geojson", slide_key="k")
    raster = np.asarray(_zarr_array(tmp_path / "s.zarr", "labels/nuclei/0")[:])
    zarr_ids = set(np.unique(raster).tolist()) - {0}
    pq_ids = set(pq.read_table(tmp_path / "s.parquet").column("id").to_pylist())
    gj = _strict_loads((tmp_path / "s.geojson").read_text())
    gj_ids = {f["properties"]["measurements"]["Nucleus ID"] for f in gj["features"]}
    assert zarr_ids == pq_ids == gj_ids == set(table.ids.tolist())


def test_empty_table(tmp_path: Path) -> None:
    t = InstanceTable.empty(PlaneInfo(("tumor",), ((255, 0, 0),), 0.25, 2.0, (70, 90)), ("area_um2",))
    assert write_geojson(t, tmp_path / "e.geojson", slide_key="k") == 0
    assert _strict_loads((tmp_path / "e.geojson").read_text())["features"] == []
    write_parquet(t, tmp_path / "e.parquet")
    assert pq.read_table(tmp_path / "e.parquet").num_rows == 0
    write_label_zarr(t, tmp_path / "e.zarr", image=None, chunk=CHUNK)
    assert not np.asarray(_zarr_array(tmp_path / "e.zarr", "labels/nuclei/0")[:]).any()


def test_atomic_writers_leave_nothing_on_failure(
    table: InstanceTable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "x.bin"
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "d.zarr") as tmpdir:
        (tmpdir / "part").write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    import histoseg.export.geojson as gj_mod
    from histoseg.export import GeoJSONWriter

    calls = {"n": 0}
    real = gj_mod.feature_ids

    def failing(*args: object) -> list[str]:
        calls["n"] += 1
        if calls["n"] == 2:  # the second band: the first one's features are in the file by now
            raise RuntimeError("writer died mid-way")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(gj_mod, "feature_ids", failing)
    half = len(table) // 2
    with pytest.raises(RuntimeError, match="mid-way"):
        with GeoJSONWriter(tmp_path / "s.geojson", slide_key="k") as writer:
            writer.write(table.take(np.arange(half)))
            assert writer.written == half > 0
            writer.write(table.take(np.arange(half, len(table))))
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_raises_output_error(
    table: InstanceTable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="file"):
        write_geojson(table, blocker / "s.geojson", slide_key="k")
    with pytest.raises(OutputError):
        write_label_zarr(table, blocker / "sub" / "s.zarr", image=None, chunk=CHUNK)
    with pytest.raises(OutputError):
        write_parquet(table, blocker / "s.parquet")

    def denied(self: Path, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    with monkeypatch.context() as m:  # what a read-only folder does to a non-root user
        m.setattr(Path, "touch", denied)
        with pytest.raises(OutputError, match="not writable"):
            write_geojson(table, tmp_path / "s.geojson", slide_key="k")
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(OutputError, match="not writable"):
                write_provenance(ro / "provenance.json", {})
        finally:
            ro.chmod(0o700)


def test_provenance_and_success(tmp_path: Path) -> None:
    record = {
        "version": "0.1.0",
        "timings": {"total_s": np.float32(1.5), "bad": math.nan, "inf": -math.inf},
        "shape": np.array([3, 4]),
        "path": tmp_path,
        "ids": (np.uint32(7),),
    }
    write_provenance(tmp_path / "provenance.json", record)
    doc = _strict_loads((tmp_path / "provenance.json").read_text())
    assert doc["timings"] == {"total_s": 1.5, "bad": "NaN", "inf": "-Infinity"}
    assert doc["shape"] == [3, 4] and doc["path"] == str(tmp_path) and doc["ids"] == [7]
    marker = write_success(tmp_path)
    assert marker == tmp_path / "_SUCCESS" and marker.read_text().strip()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_SUCCESS", "provenance.json"]


def test_label_zarr_root_image_from_slide(table: InstanceTable, tmp_path: Path) -> None:
    """The root image: the slide read through histoseg.io, 2x coarser than the labels, aligned by metadata."""
    import cv2

    h0, w0 = int(PLANE[0] * SCALE), int(PLANE[1] * SCALE)  # level-0 slide = the plane at SCALE
    yy, xx = np.mgrid[0:h0, 0:w0]
    rgb = np.stack([xx % 256, yy % 256, (xx + yy) % 200], axis=-1).astype(np.uint8)
    png = tmp_path / "slide.png"
    assert cv2.imwrite(str(png), rgb[..., ::-1])
    out = tmp_path / "s.zarr"
    image = SlideImage(png, backend="image", slide_mpp=MPP0)
    write_label_zarr(table, out, image=image, chunk=CHUNK)
    root = zarr.open_group(str(out), mode="r")
    level0, level1 = np.asarray(root["0"][:]), np.asarray(root["1"][:])
    f = int(2 * SCALE)  # level-0 slide pixels per image pixel
    assert level0.shape == (3, h0 // f, w0 // f) and level0.dtype == np.uint8
    expected = rgb.reshape(h0 // f, f, w0 // f, f, 3).astype(np.float64).mean(axis=(1, 3)).transpose(2, 0, 1)
    assert np.abs(level0 - expected).max() <= 1  # box mean of the slide, rounded
    assert level1.shape == (3, 38, 50)  # ceil halving, as the labels
    block = level0[:, :74, :].reshape(3, 37, 2, 50, 2).astype(np.float64).mean(axis=(2, 4))
    assert np.abs(level1[:, :37, :] - block).max() <= 0.5  # 2x2 mean of the level above
    last = level0[:, 74, :].astype(int)  # odd last row: averaged with itself
    np.testing.assert_array_equal(level1[:, 37, :], (2 * last[:, 0::2] + 2 * last[:, 1::2] + 2) // 4)
    (ms,) = json.loads((out / ".zattrs").read_text())["multiscales"]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"] and ms["axes"][0]["type"] == "channel"
    scale0, shift0 = ms["datasets"][0]["coordinateTransformations"]
    mpp = MPP0 * SCALE
    assert scale0["scale"] == pytest.approx([1.0, 2 * mpp, 2 * mpp])
    # image pixel centre minus half a label pixel == the labels' pure-scale position of the same point
    assert shift0["translation"] == pytest.approx([0.0, (f - SCALE) * MPP0 / 2, (f - SCALE) * MPP0 / 2])
    omero = json.loads((out / ".zattrs").read_text())["omero"]
    assert [c["color"] for c in omero["channels"]] == ["FF0000", "00FF00", "0000FF"]
    assert np.asarray(root["labels/nuclei/0"][:]).shape == PLANE  # labels unchanged under the image
