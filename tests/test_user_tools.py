"""Our outputs read through the tools users open them with (issue 9), not through our own readers.

One real run of the shipped model on CMU-1-Small-Region (``--tta none --precision fp32 --workers 1``),
then: napari-ome-zarr's reader function on the ``.zarr`` root (no GUI), ome-zarr-models validation,
geopandas on the Parquet, QuPath's GeoJSON import rules with the model card's class name and colour,
and outline area x mpp0² == ``Nucleus: Area µm^2``. Hand-built masks pin the outline rule itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi
from shapely.geometry import Polygon, shape

from histoseg.cli.main import main
from histoseg.models import ModelCard, resolve_model
from histoseg.postprocess.instances import pixel_outline, solid_mask
from histoseg.types import InstanceTable, PlaneInfo
from tests.test_export import check_qupath_feature

STEM = "CMU-1-Small-Region"


@pytest.fixture(scope="module")
def run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output folder of one real segment run (the shipped model, cheapest settings)."""
    slide = shared_data / "slides" / "aperio-cmu1-small" / f"{STEM}.svs"
    out = tmp_path_factory.mktemp("user_tools")
    args = ["segment", str(slide), "-o", str(out), "--tta", "none", "--precision", "fp32", "--workers", "1"]
    assert main(args) == 0
    return out / STEM


def _card_table(card: ModelCard | None = None) -> InstanceTable:
    card = card or resolve_model("default").card()
    return InstanceTable.empty(PlaneInfo(card.class_names, card.class_colors, 1.0, 1.0, (1, 1)))


# -- the outline rule on hand-built masks --------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "expected_area", "n_vertices"),
    [
        (["#"], 1, 4),
        (["###", "###"], 6, 4),
        (["##.", "###", ".##"], 7, 8),  # staircase: corners only where the direction changes
        (["###", "#.#", "###"], 9, 4),  # a hole is filled (one ring per nucleus)
        (["##..", "##..", "..##", "..##"], 4, 4),  # corner contact: the first of equal parts is kept
        (["####", "#..#", "#.#.", "###."], 14, 6),  # background reaching outside only diagonally: filled
    ],
)
def test_outline_follows_pixel_edges(rows: list[str], expected_area: int, n_vertices: int) -> None:
    mask = np.array([[c == "#" for c in r] for r in rows])
    solid = solid_mask(mask)
    ring = pixel_outline(solid)
    poly = Polygon(ring)
    assert poly.is_valid and poly.exterior.is_simple and poly.exterior.is_ccw
    assert poly.area == solid.sum() == expected_area and len(ring) == n_vertices
    assert np.all(ring == np.round(ring))  # vertices on pixel corners
    # the polygon covers exactly the mask's pixels: every pixel centre inside iff the pixel is set
    ys, xs = np.indices(mask.shape)
    inside = np.array([poly.contains(shape({"type": "Point", "coordinates": (x + 0.5, y + 0.5)}))
                       for y, x in zip(ys.ravel(), xs.ravel(), strict=True)]).reshape(mask.shape)  # fmt: skip
    np.testing.assert_array_equal(inside, solid)


def test_outline_of_random_blobs_is_exact() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        mask = ndi.binary_opening(rng.random((18, 18)) < 0.6) | (rng.random((18, 18)) < 0.05)
        if not mask.any():
            continue
        solid = solid_mask(mask)
        poly = Polygon(pixel_outline(solid))
        assert poly.is_valid and poly.area == solid.sum()
        lab, _ = ndi.label(solid)
        assert lab.max() == 1 and not (ndi.binary_fill_holes(solid) & ~solid).any()


# -- the real outputs through the users' tools ---------------------------------------------------------


def test_napari_reader_opens_zarr_root(run: Path) -> None:
    from napari_ome_zarr import napari_get_reader

    root = run / f"{STEM}.zarr"
    reader = napari_get_reader(str(root))
    assert reader is not None, "napari-ome-zarr does not recognise the .zarr root"
    layers = reader(str(root))
    kinds = [layer_type for _, _, layer_type in layers]
    assert kinds == ["image", "labels", "labels"]
    meta = {layer_type if layer_type == "image" else m["name"]: (data, m) for data, m, layer_type in layers}
    (img, im_meta) = meta["image"]
    assert im_meta["channel_axis"] == 0 and img[0].shape[0] == 3 and img[0].dtype == np.uint8
    assert [c.name for c in im_meta["colormap"]] == ["red", "green", "blue"]
    attrs = json.loads((root / ".zattrs").read_text())["histoseg"]
    mpp = attrs["mpp"]  # label level-0 µm per pixel
    assert im_meta["units"] == ("micrometer", "micrometer")
    assert im_meta["scale"] == pytest.approx([2 * mpp, 2 * mpp])  # image level 0: 2x coarser than labels
    nuclei, nuc_meta = meta["labels/labels/nuclei"]
    classes, cls_meta = meta["labels/labels/classes"]
    for data, m in ((nuclei, nuc_meta), (classes, cls_meta)):
        assert m["scale"] == pytest.approx([mpp, mpp]) and m["units"] == ("micrometer", "micrometer")
        # same physical extent as the image (within one image pixel)
        extent_img = np.array(img[0].shape[1:]) * 2 * mpp
        assert np.all(np.abs(np.array(data[0].shape) * mpp - extent_img) <= 2 * mpp)
    card = resolve_model("default").card()
    colours = cls_meta["colormap"]
    assert colours[0][3] == 0  # background transparent
    assert [round(v * 255) for v in colours[1]] == [*card.class_colors[0], 255]  # class 1 in the card's colour
    assert cls_meta["properties"]["name"][:2] == ["background", card.class_names[0]]
    ids = np.unique(np.asarray(nuclei[0]))
    assert ids[0] == 0 and len(ids) > 100
    assert set(np.unique(np.asarray(classes[0])).tolist()) <= {0, *range(1, len(card.class_names) + 1)}


def test_ome_zarr_models_validates_store(run: Path) -> None:
    from ome_zarr_models import open_ome_zarr
    from ome_zarr_models.v04.image import Image
    from ome_zarr_models.v04.image_label import ImageLabel

    root = run / f"{STEM}.zarr"
    model = open_ome_zarr(zarr.open_group(str(root), mode="r"))
    assert isinstance(model, Image)
    (ms,) = model.attributes.multiscales
    assert [a.name for a in ms.axes] == ["c", "y", "x"] and ms.axes[0].type == "channel"
    for name in ("nuclei", "classes"):
        label = ImageLabel.from_zarr(zarr.open_group(str(root / "labels" / name), mode="r"))
        colors = label.attributes.image_label.colors
        assert colors is not None and colors[0].label_value == 0 and colors[0].rgba == (0, 0, 0, 0)


def test_geopandas_reads_parquet(run: Path) -> None:
    import geopandas

    df = geopandas.read_parquet(run / f"{STEM}.nuclei.parquet")
    card = resolve_model("default").card()
    assert len(df) > 100 and df.geometry.is_valid.all()
    assert set(df["class_name"].astype(str)) <= set(card.class_names)
    assert (df["class_name"].astype(str) == card.class_names[0]).sum() > 0
    assert {"area_um2", "perimeter_um", "eccentricity", "solidity", "mean_hematoxylin"} <= set(df.columns)
    mpp0 = json.loads((run / "provenance.json").read_text())["slide"]["mpp"]
    np.testing.assert_allclose(df.geometry.area * mpp0**2, df["area_um2"], rtol=1e-9)


def test_geojson_features_pass_qupath_rules_with_card_classes(run: Path) -> None:
    def reject(token: str) -> Any:
        raise AssertionError(f"bare JSON constant {token}")

    doc = json.loads((run / f"{STEM}.geojson").read_text(encoding="utf-8"), parse_constant=reject)
    table = _card_table()
    table.measurements = {k: np.zeros(0) for k in ("area_um2", "perimeter_um", "eccentricity", "solidity",
                                                    "mean_hematoxylin")}  # fmt: skip
    card = resolve_model("default").card()
    mpp0 = json.loads((run / "provenance.json").read_text())["slide"]["mpp"]
    feats = doc["features"]
    assert len(feats) > 100
    ratios = []
    for f in feats:
        poly = check_qupath_feature(f, table)
        cls = f["properties"]["classification"]
        k = card.class_names.index(cls["name"])
        assert cls["color"] == list(card.class_colors[k])
        meas = f["properties"]["measurements"]
        assert {"Nucleus: Area µm^2", "Nucleus: Perimeter µm", "Detection probability"} <= set(meas)
        ratios.append(poly.area * mpp0**2 / meas["Nucleus: Area µm^2"])
    assert np.allclose(ratios, 1.0, rtol=1e-9, atol=0), (min(ratios), max(ratios))
    if card.net.n_types:  # a typed model: real tissue shows several of its types, each in its own colour
        assert len({f["properties"]["classification"]["name"] for f in feats}) >= 3
    assert not any(math.isnan(r) for r in ratios)


@pytest.mark.parametrize("model", ["typed", "lite"])
def test_typed_model_geojson_shows_its_types_in_qupath(model: str, shared_data: Path, tmp_path: Path) -> None:
    """``--model typed`` and ``--model lite`` (the opt-in typed models) on the real slide: every feature passes
    QuPath's rules with the card's classes, and the tissue shows at least three of its four types, each in the
    card's colour."""
    slide = shared_data / "slides" / "aperio-cmu1-small" / f"{STEM}.svs"
    args = ["segment", str(slide), "-o", str(tmp_path), "--model", model, "--tta", "none", "--workers", "1",
            "--no-report", "--formats", "geojson"]  # fmt: skip
    assert main(args) == 0
    card = resolve_model(model).card()
    table = _card_table(card)
    table.measurements = {k: np.zeros(0) for k in ("area_um2", "perimeter_um", "eccentricity", "solidity",
                                                    "mean_hematoxylin")}  # fmt: skip
    feats = json.loads((tmp_path / STEM / f"{STEM}.geojson").read_text(encoding="utf-8"))["features"]
    names = set()
    for f in feats:
        check_qupath_feature(f, table)
        cls = f["properties"]["classification"]
        assert cls["color"] == list(card.class_colors[card.class_names.index(cls["name"])])
        names.add(cls["name"])
    assert len(feats) > 1000 and len(names) >= 3
