"""One-pass per-nucleus sums and outlines (issue 13) give the figures of the per-crop definitions they replace.

Hand-built cases with known answers, and random label images against scikit-image / scipy and against the
per-nucleus ``pixel_outline``; a nucleus's figures are bit-identical whether it is measured in a large label
image, at another offset or in its own crop (what makes outputs independent of the region size).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import perimeter as sk_perimeter
from skimage.measure import regionprops

from histoseg.models.typemap import TypeMap
from histoseg.postprocess.instances import pixel_outline, solid_mask
from histoseg.postprocess.outlines import label_outlines
from histoseg.postprocess.pixelsums import LabelledPixels
from histoseg.postprocess.watershed import _drop_small, _remove_small, binary_open


def _random_labels(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Blobs, some merged under one id so that ids with several parts, holes and corner contacts occur."""
    lab, n = ndi.label(rng.random(shape) < rng.uniform(0.3, 0.8))
    if n > 2:
        lut = np.zeros(n + 1, np.int64)
        lut[1:] = rng.integers(1, n // 2 + 1, n)
        lab = lut[lab]
    return lab.astype(np.int32)


def test_known_square_and_line() -> None:
    lab = np.zeros((8, 10), np.int32)
    lab[1:4, 1:4] = 1  # 3 x 3 square
    lab[6, 2:8] = 2  # a 1 x 6 line
    lab[0, 9] = 3  # a single pixel at the image's edge
    px = LabelledPixels(lab)
    ids = np.array([1, 2, 3])
    s = px.sums((px.take(np.full(lab.shape, 2.5)),))
    assert s.count[1:].tolist() == [9, 6, 1]
    assert s.mean(ids, 0).tolist() == [2.5, 2.5, 2.5]
    assert s.eccentricity(ids).tolist() == [0.0, 1.0, 0.0]
    # scikit-image's estimator: the square's 8 border pixels, the line's 6, the lone pixel's 0
    assert s.perimeter_px(ids)[0] == pytest.approx(sk_perimeter(lab == 1), abs=1e-12)
    assert s.perimeter_px(ids)[1] == pytest.approx(sk_perimeter(lab == 2), abs=1e-12)
    assert s.perimeter_px(ids)[2] == 0.0 == sk_perimeter(lab == 3)
    rings = label_outlines(px, ids)
    # pixel corners from the top-left one, counter-clockwise in (x, y) (positive shoelace area)
    assert rings[0] is not None and rings[0].tolist() == [[1, 1], [4, 1], [4, 4], [1, 4]]
    assert rings[1] is not None and rings[1].tolist() == [[2, 6], [8, 6], [8, 7], [2, 7]]
    assert rings[2] is not None and rings[2].tolist() == [[9, 0], [10, 0], [10, 1], [9, 1]]


@pytest.mark.parametrize("seed", range(4))
def test_sums_equal_the_per_crop_definitions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lab = _random_labels(rng, (61, 77))
    vals = rng.random(lab.shape).astype(np.float32)
    px = LabelledPixels(lab)
    ids = np.flatnonzero(np.bincount(lab.ravel()))[1:]
    s = px.sums((px.take(vals),))
    perim, ecc, mean = s.perimeter_px(ids), s.eccentricity(ids), s.mean(ids, 0)
    for k, i in enumerate(ids):
        m = lab == i
        assert perim[k] == pytest.approx(sk_perimeter(m), rel=0, abs=1e-9)
        assert ecc[k] == pytest.approx(regionprops(m.astype(np.uint8))[0].eccentricity, rel=0, abs=1e-9)
        assert mean[k] == pytest.approx(float(vals[m].astype(np.float64).mean()), rel=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_a_nucleus_gets_bit_identical_sums_anywhere(seed: int) -> None:
    """The same labels at another offset of a larger image, and each label alone in its own crop."""
    rng = np.random.default_rng(seed)
    lab = _random_labels(rng, (40, 50))
    vals = rng.random(lab.shape).astype(np.float32)
    big_lab = np.zeros((173, 211), np.int32)
    big_vals = rng.random(big_lab.shape).astype(np.float32)
    big_lab[101:141, 37:87], big_vals[101:141, 37:87] = lab, vals
    ids = np.flatnonzero(np.bincount(lab.ravel()))[1:]
    a, b = LabelledPixels(lab), LabelledPixels(big_lab)
    sa, sb = a.sums((a.take(vals),)), b.sums((b.take(big_vals),))
    for f in ("perimeter_px", "eccentricity"):
        assert np.array_equal(getattr(sa, f)(ids), getattr(sb, f)(ids))
    assert np.array_equal(sa.mean(ids, 0), sb.mean(ids, 0))
    slices = ndi.find_objects(lab)
    for i in ids:
        sl = slices[i - 1]
        assert sl is not None
        crop = LabelledPixels((lab[sl] == i).astype(np.int32))
        one = crop.sums((crop.take(vals[sl]),))
        first = np.array([1])
        assert one.perimeter_px(first)[0] == sa.perimeter_px(np.array([i]))[0]
        assert one.eccentricity(first)[0] == sa.eccentricity(np.array([i]))[0]
        assert one.mean(first, 0)[0] == sa.mean(np.array([i]), 0)[0]


@pytest.mark.parametrize("seed", range(6))
def test_outlines_equal_pixel_outline_per_crop(seed: int) -> None:
    """Same rings as tracing each crop, and None exactly where pixel_outline refuses (not solid)."""
    rng = np.random.default_rng(seed)
    lab = _random_labels(rng, (int(rng.integers(20, 60)), int(rng.integers(20, 60))))
    ids = np.flatnonzero(np.bincount(lab.ravel()))[1:]
    rng.shuffle(ids)
    rings = label_outlines(LabelledPixels(lab), ids)
    slices = ndi.find_objects(lab)
    refused = 0
    for ring, i in zip(rings, ids, strict=True):
        sl = slices[i - 1]
        assert sl is not None
        try:
            want = pixel_outline(lab[sl] == i) + np.array([sl[1].start, sl[0].start])
        except ValueError:
            refused += 1
            assert ring is None
            continue
        assert ring is not None and np.array_equal(ring, want)
    assert 0 < refused < len(ids)  # both paths were exercised


def test_outlines_of_a_subset_ignore_the_others() -> None:
    lab = np.zeros((6, 6), np.int32)
    lab[1:3, 1:3], lab[3:5, 1:5] = 1, 2
    rings = label_outlines(LabelledPixels(lab), np.array([2]))
    assert len(rings) == 1 and rings[0] is not None
    assert rings[0].tolist() == [[1, 3], [5, 3], [5, 5], [1, 5]]
    assert label_outlines(LabelledPixels(lab), np.array([], np.int64)) == []


@pytest.mark.parametrize("seed", range(3))
def test_fast_morphology_equals_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = rng.random((83, 97)) < 0.6
    for r in (1, 2):
        yy, xx = np.ogrid[-r : r + 1, -r : r + 1]
        assert np.array_equal(binary_open(m, r), ndi.binary_opening(m, structure=(xx * xx + yy * yy) <= r * r))
    lab, _ = ndi.label(m)
    big_ids = np.flatnonzero(np.bincount(lab.ravel()) >= 5)[1:]
    want = np.where(np.isin(lab, big_ids), lab, 0)  # the big parts keep their ids, gaps and all
    got = _remove_small(lab, 5)
    assert got.dtype == lab.dtype and np.array_equal(got, want)
    assert np.array_equal(_drop_small(m, 5), want > 0)
    assert label_outlines(LabelledPixels(np.zeros((4, 4), np.int32)), np.array([1])) == [None]  # id not present


def test_measured_table_does_not_depend_on_the_region_origin() -> None:
    """measure_instances on the same labels and maps at two offsets of larger regions (other origins): the same
    polygons, measurements, classes and probabilities to the last bit (non-solid nuclei included)."""
    from histoseg.postprocess import instance_centroids, measure_instances
    from histoseg.types import PlaneInfo

    rng = np.random.default_rng(7)
    lab = _random_labels(rng, (48, 56))
    img = rng.integers(0, 256, (*lab.shape, 3), dtype=np.uint8)
    npp = rng.random(lab.shape).astype(np.float32)
    tp = rng.random((3, *lab.shape)).astype(np.float32)
    colors = ((1, 2, 3), (4, 5, 6), (7, 8, 9))
    plane = PlaneInfo(class_names=("a", "b", "c"), class_colors=colors, mpp0=0.25, scale=2.0, plane_shape=(4000, 4000))
    tables = []
    origin = (1000, 2037)  # the plane pixel of the labels' own pixel [0, 0] in both regions
    for py, px_ in ((5, 9), (71, 30)):
        big = np.zeros((140, 120), np.int32)
        big_img = rng.integers(0, 256, (140, 120, 3), dtype=np.uint8)
        big_np = rng.random((140, 120)).astype(np.float32)
        big_tp = rng.random((3, 140, 120)).astype(np.float32)
        sl = (slice(py, py + lab.shape[0]), slice(px_, px_ + lab.shape[1]))
        big[sl], big_img[sl], big_np[sl], big_tp[:, sl[0], sl[1]] = lab, img, npp, tp
        oy, ox = origin[0] - py, origin[1] - px_  # the labels' own pixel [0, 0] lands on the same plane pixel
        ids, cyx, slices = instance_centroids(big, origin_yx=(oy, ox))
        tables.append(
            measure_instances(
                big, ids, cyx, slices, origin_yx=(oy, ox), image=big_img, np_prob=big_np,
                tp_prob=TypeMap(big_tp, 1), plane=plane,
            )  # fmt: skip
        )
    a, b = tables
    assert len(a) == len(b) > 20
    assert all(np.array_equal(p, q) for p, q in zip(a.polygons, b.polygons, strict=True))
    assert np.array_equal(a.class_ids, b.class_ids) and np.array_equal(a.probabilities, b.probabilities)
    for k in a.measurements:
        assert np.array_equal(a.measurements[k], b.measurements[k]), k


@pytest.mark.parametrize("stride", [2, 4])
def test_types_from_the_head_grid_equal_types_from_the_upsampled_map(stride: int) -> None:
    """Inference keeps the type map on the head's grid (models.typemap); a nucleus's means are then the means of
    the cells under its pixels. The same table, to the last bit, as from the map upsampled to every pixel (what the
    network's training output is), non-solid nuclei (measured from a crop of the region) included."""
    from histoseg.postprocess import instance_centroids, measure_instances
    from histoseg.types import PlaneInfo

    rng = np.random.default_rng(11)
    lab = _random_labels(rng, (61, 70))  # sides off the grid: the last cells are partly outside the image
    img = rng.integers(0, 256, (*lab.shape, 3), dtype=np.uint8)
    npp = rng.random(lab.shape).astype(np.float32)
    cells = TypeMap(rng.random((3, -(-61 // stride), -(-70 // stride))).astype(np.float32), stride)
    full = cells.full(*lab.shape)
    assert full.shape == (3, 61, 70) and full[1, 60, 69] == cells.prob[1, 60 // stride, 69 // stride]
    plane = PlaneInfo(("a", "b", "c"), ((1, 2, 3), (4, 5, 6), (7, 8, 9)), mpp0=0.25, scale=2.0, plane_shape=(900, 900))
    ids, cyx, slices = instance_centroids(lab, origin_yx=(64, 128))
    a, b = (
        measure_instances(
            lab, ids, cyx, slices, origin_yx=(64, 128), image=img, np_prob=npp, tp_prob=t, plane=plane
        )
        for t in (cells, TypeMap(full, 1))
    )
    assert len(a) > 20 and len(set(a.class_ids.tolist())) == 3
    assert any(not np.array_equal(m, solid_mask(m)) for m in (lab[sl] == i for i, sl in zip(ids, slices, strict=True)
                                                               if sl is not None))  # fmt: skip
    assert np.array_equal(a.class_ids, b.class_ids) and np.array_equal(a.probabilities, b.probabilities)
