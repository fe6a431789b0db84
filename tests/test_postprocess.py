"""Post-processing recovers instances from ideal maps, and is translation-exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histoseg.datasets import load_monuseg
from histoseg.metrics import aji
from histoseg.postprocess import hematoxylin, instance_centroids, separate_instances
from histoseg.training.targets import hv_maps


def test_ideal_maps_from_monuseg_ground_truth_give_aji_099(shared_data: Path) -> None:
    scores = []
    for s in load_monuseg("test", None, root=shared_data / "nuclei" / "monuseg2018"):
        assert s.inst is not None
        pred = separate_instances((s.inst > 0).astype(np.float32), hv_maps(s.inst), s.mpp)
        scores.append(aji(s.inst, pred))
    assert len(scores) == 14
    assert np.mean(scores) >= 0.99, scores
    assert min(scores) >= 0.98, scores


def _two_touching_discs(shape: tuple[int, int] = (64, 96)) -> np.ndarray:
    yy, xx = np.indices(shape)
    lab = np.zeros(shape, np.int32)
    lab[(yy - 32) ** 2 + (xx - 36) ** 2 <= 12**2] = 1
    lab[((yy - 32) ** 2 + (xx - 58) ** 2 <= 12**2) & (lab == 0)] = 2
    return lab


def test_touching_nuclei_are_split_and_blank_input_gives_nothing() -> None:
    lab = _two_touching_discs()
    pred = separate_instances((lab > 0).astype(np.float32), hv_maps(lab), 0.25)
    assert pred.max() == 2
    assert aji(lab, pred) > 0.97
    empty = separate_instances(np.zeros((32, 32), np.float32), np.zeros((2, 32, 32), np.float32), 0.5)
    assert empty.max() == 0


def test_translation_exact_on_crops() -> None:
    """The same nucleus gives the same mask wherever the crop starts (needed for exact stitching)."""
    lab = np.zeros((160, 160), np.int32)
    lab[40:120, 40:120] = np.kron(_two_touching_discs((40, 80))[:, :40].clip(0, 2), np.ones((2, 2), np.int32))
    npm, hv = (lab > 0).astype(np.float32), hv_maps(lab)
    full = separate_instances(npm, hv, 0.25)
    crop = separate_instances(npm[20:150, 10:160], hv[:, 20:150, 10:160], 0.25)
    ids_f, c_f, _ = instance_centroids(full)
    ids_c, c_c, _ = instance_centroids(crop)
    assert len(ids_f) == len(ids_c) >= 1
    np.testing.assert_allclose(np.sort(c_f[:, 0]), np.sort(c_c[:, 0] + 20))
    for i, j in zip(ids_f, ids_c, strict=True):
        a = np.argwhere(full == i)
        b = np.argwhere(crop == j) + [20, 10]
        assert {tuple(p) for p in a} == {tuple(p) for p in b}


def test_hematoxylin_higher_on_purple_than_on_pink() -> None:
    purple = np.full((4, 4, 3), (90, 60, 150), np.uint8)
    pink = np.full((4, 4, 3), (240, 170, 210), np.uint8)
    assert hematoxylin(purple).mean() > hematoxylin(pink).mean() + 0.1


def test_shape_measures_on_hand_built_masks() -> None:
    """Eccentricity and solidity with known answers: a rectangle's pixel variances are (n² - 1) / 12 per
    axis, a line is eccentric 1, a square 0; an L of 5 pixels has a convex hull of area 7."""
    from histoseg.postprocess.instances import pixel_outline, solidity
    from histoseg.postprocess.pixelsums import LabelledPixels

    def eccentricity(mask: np.ndarray) -> float:
        return float(LabelledPixels(mask.astype(np.int32)).sums().eccentricity(np.array([1]))[0])

    rect = np.ones((3, 7), bool)
    assert np.isclose(eccentricity(rect), np.sqrt(1 - (3**2 - 1) / (7**2 - 1)), rtol=0, atol=1e-12)
    assert eccentricity(np.ones((1, 6), bool)) == 1.0
    assert eccentricity(np.ones((4, 4), bool)) == 0.0
    assert eccentricity(np.ones((1, 1), bool)) == 0.0
    assert solidity(21.0, pixel_outline(rect)) == 1.0
    ell = np.zeros((3, 3), bool)
    ell[:, 0] = True
    ell[2, :] = True
    assert solidity(float(ell.sum()), pixel_outline(ell)) == 5 / 7


