"""Training data: dataset readers (real shared data), NP/HV/TP targets, augmentation and batching."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from histoseg.datasets import Sample, load_crchisto, load_dsb, load_monuseg
from histoseg.errors import DatasetError
from histoseg.training.augment import FLAG_KEYS, Augmenter, make_targets, random_crop_batch
from histoseg.training.targets import hv_maps, np_target, type_target


def _plain(seed: int, crop: int, *, flip: bool = True, scale_prob: float = 0.0) -> Augmenter:
    """Geometric-only augmenter (all colour steps off)."""
    return Augmenter(
        np.random.default_rng(seed),
        crop,
        flip=flip,
        scale_prob=scale_prob,
        hed_scale=0.0,
        hed_shift=0.0,
        brightness=0.0,
        contrast=0.0,
        blur_prob=0.0,
    )


# --------------------------------------------------------------------------------------------- readers


@pytest.fixture(scope="module")
def monuseg_test(shared_data: Path) -> list[Sample]:
    return load_monuseg("test", None)


@pytest.fixture(scope="module")
def monuseg_train_half(shared_data: Path) -> list[Sample]:
    return load_monuseg("train", 0.5)


def test_monuseg_test_split(monuseg_test: list[Sample]) -> None:
    assert len(monuseg_test) == 14
    assert [s.name for s in monuseg_test] == sorted(s.name for s in monuseg_test)
    total = 0
    for s in monuseg_test:
        assert s.image.shape == (1000, 1000, 3) and s.image.dtype == np.uint8
        assert s.inst is not None and s.inst.dtype == np.int32 and s.inst.shape == (1000, 1000)
        assert s.semantic is None and s.points is None
        assert 0.245 <= s.mpp <= 0.253 and s.source == "monuseg2018"
        n = int(s.inst.max())
        assert len(np.unique(s.inst)) == n + 1  # ids 1..n, no gaps
        total += n
    # Every one of the 6,697 polygons survives rasterisation (none degenerate or wholly overwritten).
    assert total == 6697


def test_monuseg_train_split_native(shared_data: Path) -> None:
    samples = load_monuseg("train", None)
    assert len(samples) == 30
    with_inst = [s for s in samples if s.inst is not None]
    semantic_only = [s for s in samples if s.inst is None and s.semantic is not None]
    assert len(with_inst) == 13 and len(semantic_only) == 17
    for s in semantic_only:
        assert s.semantic is not None and s.semantic.dtype == np.bool_ and s.semantic.any()
    # 4,951 polygons in the XMLs; 2 have only two vertices (TCGA-50-5931 region 180, TCGA-E2-A1B5 region 460).
    assert sum(int(s.inst.max()) for s in with_inst if s.inst is not None) == 4949


def test_monuseg_rescale_halves_size(monuseg_train_half: list[Sample]) -> None:
    assert len(monuseg_train_half) == 30
    for s in monuseg_train_half:
        h, w = s.image.shape[:2]
        assert 490 <= h <= 510 and h == w
        assert s.mpp == pytest.approx(0.5, rel=2e-3)
        labels = s.inst if s.inst is not None else s.semantic
        assert labels is not None and labels.shape == (h, w)
    inst = next(s.inst for s in monuseg_train_half if s.inst is not None)
    assert len(np.unique(inst)) == int(inst.max()) + 1  # relabelled after nearest resize


def test_dsb(shared_data: Path) -> None:
    samples = load_dsb(None)
    assert len(samples) == 106
    assert sum(int(s.inst.max()) for s in samples if s.inst is not None) == 4556
    s = samples[0]
    assert s.image.shape == (256, 320, 3) and s.image.dtype == np.uint8 and s.mpp == 0.5
    small = load_dsb(1.0, source_mpp=0.5)[0]
    assert small.image.shape == (128, 160, 3) and small.inst is not None and small.inst.shape == (128, 160)


def test_crchisto_validation(shared_data: Path) -> None:
    samples = load_crchisto("validation", None)
    assert len(samples) == 10
    assert [s.name for s in samples] == sorted(s.name for s in samples)
    n_points = n_classified = 0
    for s in samples:
        assert s.image.shape == (500, 500, 3) and s.mpp == 0.55
        assert s.points is not None and s.point_classes is not None and s.inst is None
        assert len(s.points) == len(s.point_classes)
        assert (s.points >= 0).all() and (s.points[:, 0] <= 499).all() and (s.points[:, 1] <= 499).all()
        assert set(np.unique(s.point_classes)) <= {0, 1, 2, 3, 4}
        n_points += len(s.points)
        n_classified += int((s.point_classes > 0).sum())
    # 2,853 detections less 1 exact duplicate; 2,268 class points less 1 listed in two class files.
    assert (n_points, n_classified) == (2852, 2267)
    classified = load_crchisto("validation", None, classified_only=True)
    classes = np.concatenate([s.point_classes for s in classified if s.point_classes is not None])
    assert len(classes) == 2267 and set(np.unique(classes)) == {1, 2, 3, 4}
    for s in load_crchisto("validation", 0.5):
        h, w = s.image.shape[:2]
        assert (h, w) == (550, 550)
        assert s.points is not None and (s.points >= 0).all()
        assert (s.points[:, 0] <= w - 1).all() and (s.points[:, 1] <= h - 1).all()


def test_missing_folders_raise_dataset_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match="not found"):
        load_monuseg("test", None, root=missing)
    with pytest.raises(DatasetError, match="not found"):
        load_dsb(None, root=missing)
    with pytest.raises(DatasetError, match="not found"):
        load_crchisto("train", None, root=missing)
    with pytest.raises(DatasetError, match="not found"):
        load_monuseg("train", None, root=tmp_path)  # exists, but has no MoNuSegTrainingData


# --------------------------------------------------------------------------------------------- targets


def test_hv_maps_square_exact() -> None:
    inst = np.zeros((9, 9), dtype=np.int32)
    inst[2:7, 3:8] = 1
    hv = hv_maps(inst)
    assert hv.shape == (2, 9, 9) and hv.dtype == np.float32
    ramp = np.array([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=np.float32)
    np.testing.assert_array_equal(hv[0, 2:7, 3:8], np.tile(ramp, (5, 1)))  # x varies along columns
    np.testing.assert_array_equal(hv[1, 2:7, 3:8], np.tile(ramp[:, None], (1, 5)))  # y along rows
    assert not hv[:, inst == 0].any()


def test_hv_maps_per_instance_normalisation() -> None:
    inst = np.zeros((20, 30), dtype=np.int32)
    inst[1:4, 1:4] = 3  # 3x3
    inst[5:16, 10:29] = 7  # 11x19 (ids need not be contiguous)
    hv = hv_maps(inst)
    for label, w in ((3, 3), (7, 19)):
        m = inst == label
        for axis in (0, 1):
            vals = hv[axis][m]
            assert vals.min() == -1.0 and vals.max() == 1.0
        cols = np.nonzero(m.any(axis=0))[0]
        np.testing.assert_allclose(hv[0, np.nonzero(m.any(axis=1))[0][0], cols], np.linspace(-1, 1, w))
    single = np.zeros((5, 5), np.int32)
    single[2, 2] = 1
    assert not hv_maps(single).any()


def test_hv_maps_fast() -> None:
    inst = np.zeros((1000, 1000), dtype=np.int32)
    yy, xx = np.mgrid[-9:10, -9:10]
    disc = xx**2 + yy**2 <= 64
    label = 0
    for cy in range(15, 1000, 37):
        for cx in range(15, 1000, 37):
            if label == 700:
                break
            label += 1
            inst[cy - 9 : cy + 10, cx - 9 : cx + 10][disc] = label
    assert inst.max() == 700
    t0 = time.perf_counter()
    hv = hv_maps(inst)
    assert time.perf_counter() - t0 < 1.0
    assert hv[0][inst > 0].min() == -1.0 and hv[1][inst > 0].max() == 1.0


def test_np_and_type_targets() -> None:
    inst = np.array([[0, 1, 1], [2, 2, 0], [0, 5, 5]], dtype=np.int32)
    np.testing.assert_array_equal(np_target(inst), (inst > 0).astype(np.uint8))
    np.testing.assert_array_equal(np_target(inst > 0), np_target(inst))
    assert np_target(inst).dtype == np.uint8
    tp = type_target(inst, {1: 2, 2: 4, 5: 1, 9: 3})
    np.testing.assert_array_equal(tp, [[0, 2, 2], [4, 4, 0], [0, 1, 1]])
    assert tp.dtype == np.uint8
    lut = np.array([0, 3, 1, 0, 0, 2])
    np.testing.assert_array_equal(type_target(inst, lut), [[0, 3, 3], [1, 1, 0], [0, 2, 2]])


# ---------------------------------------------------------------------------------------- augmentation


def _marked_sample(size: tuple[int, int] = (64, 64)) -> Sample:
    """White image with one dark asymmetric nucleus (instance 1, type 2) and a point at its centre."""
    h, w = size
    image = np.full((h, w, 3), 255, dtype=np.uint8)
    inst = np.zeros((h, w), dtype=np.int32)
    inst[10:16, 40:52] = 1  # 6 x 12 rectangle, off-centre
    inst[16:20, 40:44] = 1  # plus a foot: an L shape
    image[inst == 1] = (60, 20, 120)
    types = (inst * 2).astype(np.uint8)
    ys, xs = np.nonzero(inst)
    points = np.array([[xs.mean(), ys.mean()]])
    classes = np.array([3])
    return Sample(
        name="marked", image=image, inst=inst, types=types, points=points, point_classes=classes, mpp=0.5
    )


def test_augment_keeps_image_labels_points_aligned() -> None:
    sample = _marked_sample()
    assert sample.inst is not None
    area = int((sample.inst > 0).sum())
    seen = set()
    for seed in range(40):
        aug = _plain(seed, 64)(sample)
        assert aug.inst is not None and aug.types is not None and aug.points is not None
        dark = aug.image.min(axis=2) < 128
        np.testing.assert_array_equal(dark, aug.inst == 1)
        np.testing.assert_array_equal(aug.types, (aug.inst * 2).astype(np.uint8))
        assert int(dark.sum()) == area
        ys, xs = np.nonzero(aug.inst)
        np.testing.assert_allclose(aug.points[0], [xs.mean(), ys.mean()], atol=1e-9)
        assert aug.point_classes is not None and aug.point_classes.tolist() == [3]
        seen.add(aug.inst.tobytes())
    assert len(seen) == 8  # all flips x rotations happen and stay consistent


def test_augment_scale_and_crop_keep_alignment() -> None:
    sample = _marked_sample((96, 96))
    for seed in range(20):
        aug = _plain(seed, 48, scale_prob=1.0)(sample)
        assert aug.image.shape == (48, 48, 3) and aug.inst is not None and aug.inst.shape == (48, 48)
        dark = aug.image.min(axis=2) < 128
        nucleus = aug.inst == 1
        border = ndimage.binary_dilation(nucleus) & ~ndimage.binary_erosion(nucleus)
        assert not (dark & ~nucleus & ~border).any() and not (nucleus & ~dark & ~border).any()
        assert (dark & nucleus).sum() >= 0.5 * nucleus.sum()
        assert aug.points is not None
        if aug.inst.any():
            ys, xs = np.nonzero(aug.inst)
            if len(aug.points) == 1 and xs.min() > 0 and xs.max() < 47 and ys.min() > 0 and ys.max() < 47:
                np.testing.assert_allclose(aug.points[0], [xs.mean(), ys.mean()], atol=1.0)


def test_augment_pads_small_images_white() -> None:
    sample = _marked_sample((30, 70))
    aug = _plain(1, 100)(sample)
    assert aug.image.shape == (100, 100, 3) and aug.inst is not None and sample.inst is not None
    assert int((aug.inst > 0).sum()) == int((sample.inst > 0).sum())
    assert (aug.image[aug.inst == 0] == 255).all()  # padding is white, labels 0


def test_augment_deterministic_for_seed() -> None:
    sample = _marked_sample((80, 80))
    sample.image[::3] = 200  # some texture for the colour steps
    a = Augmenter(np.random.default_rng(7), 48)(sample)
    b = Augmenter(np.random.default_rng(7), 48)(sample)
    c = Augmenter(np.random.default_rng(8), 48)(sample)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.inst is not None and b.inst is not None and a.points is not None and b.points is not None
    np.testing.assert_array_equal(a.inst, b.inst)
    np.testing.assert_array_equal(a.points, b.points)
    assert not np.array_equal(a.image, c.image)


def test_colour_jitter_is_image_only_and_lossless_at_zero() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_plain(0, 32).photometric(image), image)
    jittered = Augmenter(np.random.default_rng(3), 32, hed_scale=0.3, blur_prob=1.0).photometric(image)
    assert jittered.shape == image.shape and jittered.dtype == np.uint8
    assert not np.array_equal(jittered, image)


def test_hv_recomputed_after_rotation() -> None:
    sample = _marked_sample()
    assert sample.inst is not None
    hv_orig = hv_maps(sample.inst)
    odd = 0
    for seed in range(20):
        aug = _plain(seed, 64, flip=False)(sample)
        assert aug.inst is not None
        k = next(k for k in range(4) if np.array_equal(aug.inst, np.rot90(sample.inst, k)))
        _, np_map, hv, _ = make_targets(aug)
        np.testing.assert_array_equal(hv, hv_maps(np.rot90(sample.inst, k)))
        np.testing.assert_array_equal(np_map, aug.inst > 0)
        if k % 2:
            odd += 1
            stale = np.rot90(hv_orig, k, axes=(1, 2))  # rotated values: x/y channels not swapped
            assert not np.allclose(hv, stale)
    assert odd > 0


def test_random_crop_batch_mixed_labels() -> None:
    inst_sample = _marked_sample((80, 80))
    assert inst_sample.inst is not None
    image = inst_sample.image
    semantic = Sample(name="sem", image=image.copy(), semantic=np.asarray(inst_sample.inst > 0), mpp=0.5)
    pts = Sample(
        name="pts", image=image.copy(), mpp=0.5, points=np.array([[45.0, 14.0]]), point_classes=np.array([1])
    )
    samples = [inst_sample, semantic, pts]
    batch = random_crop_batch(samples, Augmenter(np.random.default_rng(0), 64), 3, indices=[0, 1, 2])
    assert batch.image.shape == (3, 3, 64, 64) and batch.image.dtype == np.float32
    assert 0.0 <= batch.image.min() and batch.image.max() <= 1.0
    assert batch.np_map.shape == (3, 64, 64) and batch.np_map.dtype == np.uint8
    assert batch.hv.shape == (3, 2, 64, 64) and batch.hv.dtype == np.float32
    assert batch.tp.shape == (3, 64, 64) and batch.tp.dtype == np.uint8
    assert set(batch.flags) == set(FLAG_KEYS)
    assert batch.flags["has_inst"].tolist() == [True, False, False]
    assert batch.flags["has_semantic"].tolist() == [False, True, False]
    assert batch.flags["has_np"].tolist() == [True, True, False]
    assert batch.flags["has_types"].tolist() == [True, False, False]
    assert batch.flags["has_points"].tolist() == [True, False, True]
    assert not batch.hv[1:].any() and not batch.np_map[2].any() and not batch.tp[1:].any()
    assert batch.names == ["marked", "sem", "pts"] and batch.points[1] is None
    drawn = random_crop_batch(samples, Augmenter(np.random.default_rng(5), 32), 6)
    assert drawn.image.shape == (6, 3, 32, 32) and len(drawn.names) == 6


def test_random_crop_batch_real_monuseg(monuseg_train_half: list[Sample]) -> None:
    batch = random_crop_batch(monuseg_train_half, Augmenter(np.random.default_rng(0), 256), 8)
    assert batch.image.shape == (8, 3, 256, 256)
    has_np = batch.flags["has_np"]
    assert has_np.all()  # every MoNuSeg training image has instance or semantic labels
    assert (batch.np_map[has_np].reshape(8, -1).mean(axis=1) > 0.01).all()
    inst = batch.flags["has_inst"]
    assert np.abs(batch.hv[inst]).max() <= 1.0 and not batch.hv[~inst].any()
