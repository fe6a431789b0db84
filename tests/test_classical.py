"""The classical baseline (``benchmarks/classical.py``) on hand-built images with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import classical

PINK = (235, 170, 205)  # eosin-stained background: hematoxylin OD about 0
PURPLE = (75, 45, 125)  # hematoxylin-stained nucleus: OD about 1.5
RADIUS_UM = 3.0  # nucleus radius, µm


def _scene(size_um: float, mpp: float, centres_um: list[tuple[float, float]], seed: int = 0) -> np.ndarray:
    """Pink RGB image of ``size_um`` square with purple discs of ``RADIUS_UM`` at (y, x) µm centres."""
    n = int(round(size_um / mpp))
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) * mpp
    img = np.empty((n, n, 3), np.float64)
    img[:] = PINK
    for cy, cx in centres_um:
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= RADIUS_UM**2
        img[inside] = PURPLE
    img += np.random.default_rng(seed).normal(0.0, 4.0, img.shape)  # mild sensor noise
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _disc_ids(labels: np.ndarray, mpp: float, centres_um: list[tuple[float, float]]) -> list[int]:
    return [int(labels[int(cy / mpp), int(cx / mpp)]) for cy, cx in centres_um]


@pytest.mark.parametrize("mpp", [0.25, 0.5])
def test_two_separated_discs_give_two_instances(mpp: float) -> None:
    centres = [(10.0, 10.0), (10.0, 30.0)]
    labels = classical.classical_instances(_scene(40.0, mpp, centres), mpp)
    assert labels.dtype == np.int32 and labels.shape == (int(round(40 / mpp)),) * 2
    assert set(np.unique(labels)) == {0, 1, 2}
    ids = _disc_ids(labels, mpp, centres)
    assert sorted(ids) == [1, 2]
    true_area = np.pi * (RADIUS_UM / mpp) ** 2
    for i in ids:
        assert abs((labels == i).sum() / true_area - 1.0) < 0.1


@pytest.mark.parametrize("mpp", [0.25, 0.5])
def test_two_touching_discs_are_split(mpp: float) -> None:
    # centres 1.8 radii apart: the discs overlap into one connected blob with a narrow waist
    gap = 1.8 * RADIUS_UM
    centres = [(15.0, 15.0 - gap / 2), (15.0, 15.0 + gap / 2)]
    img = _scene(30.0, mpp, centres, seed=1)
    labels = classical.classical_instances(img, mpp)
    assert labels.max() == 2
    a, b = _disc_ids(labels, mpp, centres)
    assert {a, b} == {1, 2}
    # the cut runs through the waist: the two halves are about equal
    sizes = np.bincount(labels.ravel())[1:]
    assert sizes.min() / sizes.max() > 0.85
    cut_col = int(round(15.0 / mpp))
    left, right = np.unique(labels[:, : cut_col - 2]), np.unique(labels[:, cut_col + 2 :])
    assert set(left) - {0} == {a} and set(right) - {0} == {b}


def test_empty_pink_image_gives_no_instances() -> None:
    labels = classical.classical_instances(_scene(100.0, 0.25, []), 0.25)
    assert labels.dtype == np.int32 and labels.shape == (400, 400)
    assert labels.max() == 0


def test_constant_image_gives_no_instances() -> None:
    img = np.full((64, 64, 3), PINK, np.uint8)
    assert classical.classical_instances(img, 0.5).max() == 0


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        classical.classical_instances(np.zeros((8, 8), np.uint8), 0.5)
    with pytest.raises(ValueError):
        classical.classical_instances(np.zeros((8, 8, 3), np.uint8), 0.0)
