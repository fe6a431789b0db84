"""Point-labelled crops become dense training labels: random walk (learned affinity) and Voronoi baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from histoseg.metrics.instance import aji
from histoseg.models import ModelCard, NetConfig
from histoseg.models.inputs import to_input
from histoseg.training.points import PointSupervision
from tests.synthetic import random_nuclei, render


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = random_nuclei((128, 128), 25, seed=3, r_range=(5, 9))  # 0.5 µm/px: nuclei 5-9 µm across
    image = render(labels, seed=3)
    image[:, 110:] = (236, 170, 200)  # tissue everywhere (render adds a glass margin)
    ids = np.arange(1, labels.max() + 1)
    cyx = np.asarray(ndi.center_of_mass(np.ones_like(labels), labels, ids))
    return labels, image, cyx[:, ::-1].copy()


def _input(image: np.ndarray) -> torch.Tensor:
    card = ModelCard(name="t", net=NetConfig(width=8), mpp=0.5)
    return to_input(image, card)[0]


def test_random_walk_labels_recover_the_nuclei_and_carry_gradient(scene: tuple[np.ndarray, ...]) -> None:
    labels, image, points = scene
    torch.manual_seed(0)
    sup = PointSupervision(0.5)
    t = sup(_input(image), image, points, "randomwalk")
    assert t.inst.shape == labels.shape and t.weight.shape == labels.shape
    assert set(np.unique(t.inst)) - {0} <= set(range(1, len(points) + 1))
    for i, (x, y) in enumerate(points, start=1):  # each point's instance contains the point
        assert t.inst[int(round(y)), int(round(x))] == i
    assert aji(labels, t.inst) > 0.8
    assert 0.0 <= t.weight.min() and t.weight.max() <= 1.0
    # the soft nucleus target is differentiable with respect to the learned affinity
    (t.nucleus * torch.from_numpy(labels > 0).float()).sum().backward()
    grads = [p.grad for p in sup.affinity.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_voronoi_baseline_gives_fixed_labels(scene: tuple[np.ndarray, ...]) -> None:
    labels, image, points = scene
    sup = PointSupervision(0.5)
    t = sup(_input(image), image, points, "voronoi")
    assert not t.nucleus.requires_grad
    assert aji(labels, t.inst) > 0.5
    again = sup(_input(image), image, points, "voronoi")
    assert np.array_equal(t.inst, again.inst) and np.array_equal(t.weight, again.weight)


def test_a_crop_without_points_is_background(scene: tuple[np.ndarray, ...]) -> None:
    _, image, _ = scene
    t = PointSupervision(0.5)(_input(image), image, np.zeros((0, 2)), "randomwalk")
    assert t.inst.max() == 0 and float(t.nucleus.max()) == 0.0 and t.weight.min() == 1.0


def test_a_users_clicks_supervise_only_near_the_clicks(scene: tuple[np.ndarray, ...]) -> None:
    """Non-exhaustive clicks (QuPath fine-tuning): far from every click nothing is learned."""
    _, image, points = scene
    few = points[:2]
    t = PointSupervision(0.5)(_input(image), image, few, "randomwalk", exhaustive=False)
    yy, xx = np.mgrid[0:128, 0:128]
    dist = np.min([np.hypot(xx - x, yy - y) for x, y in few], axis=0)
    assert np.all(t.weight[dist > 36.5] == 0)  # 18 µm at 0.5 µm/px
    assert t.weight[dist < 10].mean() > 0.3
    nothing = PointSupervision(0.5)(_input(image), image, np.zeros((0, 2)), "randomwalk", exhaustive=False)
    assert nothing.weight.max() == 0.0


def test_hard_targets_train_the_network_and_the_walk_learns_from_the_network(scene: tuple[np.ndarray, ...]) -> None:
    """``point_target: hard``: the network's NP loss has no gradient to the affinity; the consistency term
    trains only the affinity (the network's side is held fixed). ``soft``: one term trains both."""
    from histoseg.datasets import Sample
    from histoseg.training.data import TrainingSource
    from histoseg.training.labels import DatasetSpec
    from histoseg.training.objective import Stage, batch_loss

    labels, image, points = scene
    crop = Sample(name="c", image=image, points=points, mpp=0.5)
    src = TrainingSource(DatasetSpec(name="monuseg", labels="points"), [crop], np.full(1, -1, np.int64))
    x = _input(image)[None]
    for target in ("hard", "soft"):
        torch.manual_seed(0)
        sup = PointSupervision(0.5)
        logits = torch.zeros(1, 2, 128, 128, requires_grad=True)
        out = {"np": logits, "hv": torch.zeros(1, 2, 128, 128, requires_grad=True)}
        _, terms = batch_loss(out, x, [(crop, 0)], [src], sup, Stage(point_target=target))  # type: ignore[arg-type]
        assert ("affinity" in terms) == (target == "hard")
    sup = PointSupervision(0.5)
    logits = torch.zeros(1, 2, 128, 128, requires_grad=True)
    out = {"np": logits, "hv": torch.zeros(1, 2, 128, 128)}
    t = sup(x[0], image, points, "randomwalk")
    from histoseg.training.losses import np_soft_loss

    hard = torch.from_numpy((t.inst > 0).astype(np.float32))[None]
    np_soft_loss(logits, hard, torch.from_numpy(t.weight)[None]).backward()
    assert all(p.grad is None for p in sup.affinity.parameters())  # hard targets carry no affinity gradient
    assert float(logits.grad.abs().sum()) > 0  # type: ignore[union-attr]
