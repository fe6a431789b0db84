"""The embedded demo-slide generator ``sample_data/make_sample.py`` and its ``synth_*`` modules (small sizes,
< 30 s in all)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu

from histoseg.types import Box
from sample_data import make_sample as ms
from sample_data import synth_common as common

SIZE = 1024
SEED = 0


@pytest.fixture(scope="module")
def sample() -> tuple[Any, np.ndarray]:
    return ms.generate(SIZE, SIZE, SEED)


def test_deterministic_for_a_seed(sample: tuple[Any, np.ndarray]) -> None:
    scene, rgb = sample
    again, rgb2 = ms.generate(SIZE, SIZE, SEED)
    assert np.array_equal(scene.labels, again.labels)
    assert np.array_equal(scene.classes, again.classes)
    assert np.array_equal(scene.centroids, again.centroids)
    assert np.array_equal(rgb, rgb2)
    other = ms.build_scene(SIZE, SIZE, SEED + 1)
    assert not np.array_equal(scene.labels, other.labels)


def test_pixels_do_not_depend_on_strip_height(sample: tuple[Any, np.ndarray]) -> None:
    """Strip rendering is seam-free: any strip height gives the very same pixels."""
    scene, rgb = sample
    assert np.array_equal(ms.render(scene, strip=200), rgb)
    box = Box(100, 300, 500, 250)
    assert np.array_equal(ms.RowSource(scene, strip=128)(box), rgb[300:550, 100:600])


def test_ground_truth_consistent(sample: tuple[Any, np.ndarray]) -> None:
    scene, rgb = sample
    labels, classes, cents = scene.labels, scene.classes, scene.centroids
    n = classes.size
    assert labels.dtype == np.uint32 and labels.shape == (SIZE, SIZE) == rgb.shape[:2]
    assert n > 100 and cents.shape == (n, 2)
    assert np.array_equal(np.unique(labels), np.arange(n + 1))
    assert set(np.unique(classes)) == {1, 2, 3, 4}
    ids = np.arange(1, n + 1)
    # the centroid of each instance, recomputed, and the pixel under it belong to that instance
    area = ndi.sum_labels(np.ones(labels.shape), labels, ids)
    ys, xs = np.indices(labels.shape)
    cy = ndi.sum_labels(ys, labels, ids) / area + 0.5
    cx = ndi.sum_labels(xs, labels, ids) / area + 0.5
    np.testing.assert_allclose(cents, np.stack([cx, cy], axis=1), atol=1e-6)
    assert np.array_equal(labels[cents[:, 1].astype(int), cents[:, 0].astype(int)], ids)
    # one connected piece per instance, none cut by the canvas edge
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        assert sl is not None
        assert ndi.label(labels[sl] == i)[1] == 1
    assert not np.any(labels[[0, -1], :]) and not np.any(labels[:, [0, -1]])


def test_nucleus_sizes_per_class(sample: tuple[Any, np.ndarray]) -> None:
    """Equivalent diameters 6-12 µm (25-50 px at 0.25 µm/px); lymphocytes smallest, fibroblasts longest."""
    scene, _ = sample
    n = scene.classes.size
    area = ndi.sum_labels(np.ones(scene.labels.shape), scene.labels, np.arange(1, n + 1))
    diam_um = 2 * np.sqrt(area / np.pi) * ms.MPP
    assert 5.0 < np.median(diam_um) < 12.0
    med = {c: np.median(diam_um[scene.classes == c]) for c in (1, 2, 3, 4)}
    assert med[2] < med[1]
    extent = np.array(
        [max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) for sl in ndi.find_objects(scene.labels)]
    )
    assert np.median(extent[scene.classes == 3]) > 1.5 * np.median(extent[scene.classes == 2])
    assert 5.5 < med[2] < 8.0 and 8.0 < med[1] < 12.5
    touching = _touching_fraction(scene.labels)
    assert 0.01 < touching < 0.5  # some nuclei abut, like in real tissue; most are apart


def _touching_fraction(labels: np.ndarray) -> float:
    """Fraction of instances with a 4-neighbour pixel of another instance."""
    a, b = labels[:, :-1], labels[:, 1:]
    c, d = labels[:-1, :], labels[1:, :]
    pairs = np.concatenate(
        [
            np.stack([a[(a != b) & (a > 0) & (b > 0)], b[(a != b) & (a > 0) & (b > 0)]]),
            np.stack([c[(c != d) & (c > 0) & (d > 0)], d[(c != d) & (c > 0) & (d > 0)]]),
        ],
        axis=1,
    )
    return np.unique(pairs).size / max(int(labels.max()), 1)


def test_background_and_tissue_fractions(sample: tuple[Any, np.ndarray]) -> None:
    scene, rgb = sample
    white = (rgb.min(axis=2) > 215) & (rgb.max(axis=2).astype(int) - rgb.min(axis=2) < 15)
    assert 0.28 < white.mean() < 0.55  # background around the tissue pieces, plus lumens
    assert 0.5 <= scene.tissue_fraction <= 0.7
    bg = rgb[white].mean(axis=0)
    assert np.all((bg > 232) & (bg < 250))  # off-white glass, not 255
    # a saturation tissue mask (as the pipeline uses) finds no tissue in the background corners
    sat = rgb.max(axis=2).astype(int) - rgb.min(axis=2)
    assert sat[:24, :24].max() < 20 and sat[scene.labels > 0].min() > 20


def test_nuclei_darker_than_stroma_in_hematoxylin(sample: tuple[Any, np.ndarray]) -> None:
    scene, rgb = sample
    hem = rgb2hed(rgb)[..., 0]
    nuclei = scene.labels > 0
    near = ndi.binary_dilation(nuclei, iterations=4)
    stroma = (scene.comp == common.C_STROMA) & ~near & (rgb.min(axis=2) < 215)
    assert stroma.sum() > 10_000
    h_nuc, h_str = np.median(hem[nuclei]), np.median(hem[stroma])
    assert h_nuc > h_str + 0.03
    for c in (1, 2, 3, 4):  # every class, lymphocytes darkest
        assert np.median(hem[np.isin(scene.labels, np.flatnonzero(scene.classes == c) + 1)]) > h_str + 0.02
    # H&E colours: nuclei blue-purple (blue highest, red above green), stroma pink (red highest)
    nuc_rgb, str_rgb = rgb[nuclei].mean(axis=0), rgb[stroma].mean(axis=0)
    assert nuc_rgb[2] > nuc_rgb[0] > nuc_rgb[1] and nuc_rgb.mean() < str_rgb.mean() - 50
    assert str_rgb[0] > str_rgb[2] > str_rgb[1]
    # colour deconvolution + Otsu already recovers the nuclei: they are separable like real H&E nuclei
    found = hem > threshold_otsu(hem)
    assert 2 * np.count_nonzero(found & nuclei) / (found.sum() + nuclei.sum()) > 0.85


def test_cli_writes_slide_and_ground_truth(tmp_path: Path) -> None:
    tiffslide = pytest.importorskip("tiffslide")
    out = tmp_path / "demo.tif"
    assert ms.main([str(out), "--size", "1024x768", "--seed", "3"]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["size"] == [1024, 768] and meta["mpp"] == 0.25 and meta["seed"] == 3
    gt = np.load(out.with_suffix(".npz"))
    labels, classes, cents = gt["labels"], gt["classes"], gt["centroids"]
    assert labels.shape == (768, 1024) and labels.dtype == np.uint32
    assert meta["nucleus_count"] == classes.size == cents.shape[0] == int(labels.max())
    assert sum(meta["class_counts"].values()) == classes.size
    assert list(gt["class_names"]) == list(ms.CLASS_NAMES)

    with tiffslide.TiffSlide(out) as slide:
        assert slide.level_count >= 2
        assert slide.dimensions == (1024, 768)
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.25)
        assert float(slide.properties["tiffslide.mpp-y"]) == pytest.approx(0.25)
        got = np.asarray(slide.read_region((0, 0), 0, (1024, 768)).convert("RGB"), dtype=np.float32)
    _, rgb = ms.generate(1024, 768, 3)
    assert np.abs(got - rgb).mean() < 3.0  # same pixels up to JPEG (quality 90)


def test_size_argument() -> None:
    assert ms._parse_size("2048") == (2048, 2048)
    assert ms._parse_size("1024x512") == (1024, 512)
    for bad in ("12", "axb", "1x2x3"):
        with pytest.raises(Exception, match="size"):
            ms._parse_size(bad)
