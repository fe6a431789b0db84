"""The unified label space (UniSeg): class masks, class-independent BCE, relation rows, stage-2 targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histoseg.datasets import Sample
from histoseg.errors import ConfigError
from histoseg.models import ModelCard, NetConfig, NucleiNet
from histoseg.training.data import TrainingSource
from histoseg.training.labels import GENERIC_LABEL, DatasetSpec, relation_rows, type_colors, type_targets
from histoseg.training.losses import tp_bce
from histoseg.training.stage2 import measure_relations

TYPES = ("Epithelial", "Fibroblast", "Inflammatory")


def _crop() -> tuple[np.ndarray, np.ndarray]:
    """A 6x6 crop with two nuclei: id 1 (type 0) and id 2 (type unknown)."""
    inst = np.zeros((6, 6), np.int32)
    inst[1:3, 1:3] = 1
    inst[3:5, 3:5] = 2
    return inst, np.array([-1, 0, -1], dtype=np.int64)


def test_a_type_the_dataset_lacks_gets_zero_gradient() -> None:
    inst, types = _crop()
    spec = DatasetSpec(
        name="crchisto", labels="points", classes={"epithelial": "Epithelial", "fibroblast": "Fibroblast"}
    )
    mask = spec.class_mask(TYPES)
    assert mask.tolist() == [True, True, False]
    target, weight = type_targets(inst, types, np.ones(inst.shape, np.float32), mask)
    logits = torch.zeros(1, 3, 6, 6, requires_grad=True)
    tp_bce(
        logits, torch.from_numpy(target)[None], torch.from_numpy(weight)[None], torch.from_numpy(inst > 0)[None]
    ).backward()
    g = logits.grad[0]  # type: ignore[index]
    nuc1, nuc2, bg = inst == 1, inst == 2, inst == 0
    # the unannotated type gets no gradient at any nucleus pixel
    assert torch.all(g[2][torch.from_numpy(nuc1 | nuc2)] == 0)
    # a nucleus of unknown type trains no type at all (stage 1)
    assert torch.all(g[:, torch.from_numpy(nuc2)] == 0)
    # the typed nucleus: its type is pushed up (negative gradient), the other annotated type down
    assert torch.all(g[0][torch.from_numpy(nuc1)] < 0) and torch.all(g[1][torch.from_numpy(nuc1)] > 0)
    # background: every type is "absent", pushed down
    assert torch.all(g[:, torch.from_numpy(bg)] > 0)


def test_type_targets_follow_the_rules_exactly() -> None:
    inst, types = _crop()
    mask = np.array([True, True, False])
    pw = np.full(inst.shape, 0.5, np.float32)
    target, weight = type_targets(inst, types, pw, mask)
    assert target[:, inst == 0].max() == 0 and np.all(weight[:, inst == 0] == 0.5)
    assert np.all(target[0][inst == 1] == 1) and np.all(target[1][inst == 1] == 0)
    assert np.all(weight[:2][:, inst == 1] == 0.5) and np.all(weight[2][inst == 1] == 0)
    assert np.all(weight[:, inst == 2] == 0)


def test_relation_rows_keep_only_types_the_dataset_does_not_annotate() -> None:
    rows = relation_rows(
        {GENERIC_LABEL: np.array([0.6, 0.3, 0.1]), "0": np.array([0.9, 0.05, 0.2])}, np.array([True, False, False])
    )
    assert np.isnan(rows[GENERIC_LABEL][0]) and rows[GENERIC_LABEL][1:].tolist() == [0.3, 0.1]
    assert np.isnan(rows["0"][0]) and rows["0"][2] == pytest.approx(0.2)
    with pytest.raises(ConfigError):
        relation_rows({"x": np.zeros(2)}, np.zeros(3, bool))


def test_stage_two_soft_targets_for_a_dataset_without_types() -> None:
    inst, _ = _crop()
    untyped = np.full(3, -1, np.int64)
    rel = {GENERIC_LABEL: np.array([0.5, 0.25, 0.125])}
    target, weight = type_targets(inst, untyped, np.ones(inst.shape, np.float32), np.zeros(3, bool), rel, 0.1)
    nuc = inst > 0
    assert np.allclose(target[:, nuc].T, [0.5, 0.25, 0.125]) and np.allclose(weight[:, nuc], 0.1)
    assert np.all(target[:, ~nuc] == 0) and np.all(weight[:, ~nuc] == 1)


def _constant_type_net(p: list[float]) -> tuple[NucleiNet, ModelCard]:
    cfg = NetConfig(width=8, n_types=len(p))
    net = NucleiNet(cfg).eval()
    with torch.no_grad():
        assert net.tp_head is not None
        net.tp_head.out.weight.zero_()
        net.tp_head.out.bias.copy_(torch.logit(torch.tensor(p)))
    card = ModelCard(name="t", net=cfg, mpp=0.5, class_names=TYPES[: len(p)], class_colors=type_colors(TYPES[: len(p)]))
    return net, card


def test_measured_relations_on_a_toy_two_dataset_case() -> None:
    """Dataset A has points of two types, dataset B only untyped masks. A model that outputs the constant
    type probabilities p gives relation rows equal to p, kept only where each dataset lacks the type."""
    p = [0.7, 0.2, 0.1]
    net, card = _constant_type_net(p)
    img = np.full((64, 64, 3), 200, np.uint8)
    inst = np.zeros((64, 64), np.int32)
    inst[10:20, 10:20] = 1
    a = Sample(
        name="a", image=img, points=np.array([[15.0, 15.0], [40.0, 40.0]]), point_classes=np.array([1, 2]), mpp=0.5
    )
    b = Sample(name="b", image=img, inst=inst, mpp=0.5)
    spec_a = DatasetSpec(
        name="crchisto", labels="points", classes={"epithelial": "Epithelial", "fibroblast": "Fibroblast"}
    )
    spec_b = DatasetSpec(name="monuseg", labels="instances")
    src_a = TrainingSource(spec_a, [a], spec_a.class_lookup(("epithelial", "fibroblast"), TYPES))
    src_b = TrainingSource(spec_b, [b], np.full(1, -1, np.int64))
    rel = measure_relations(net, card, [src_a, src_b], TYPES)
    assert set(rel[0]) == {"0", "1"}  # A's two types
    assert np.isnan(rel[0]["0"][:2]).all() and rel[0]["0"][2] == pytest.approx(0.1, abs=1e-5)
    assert set(rel[1]) == {GENERIC_LABEL}
    assert np.allclose(rel[1][GENERIC_LABEL], p, atol=1e-5)


def test_dataset_spec_errors() -> None:
    with pytest.raises(ConfigError, match="not in types"):
        DatasetSpec.from_dict({"name": "crchisto", "classes": {"epithelial": "Tumour"}}, TYPES)
    with pytest.raises(ConfigError, match="points only"):
        DatasetSpec.from_dict({"name": "crchisto", "labels": "instances"}, TYPES)
    with pytest.raises(ConfigError, match="unknown keys"):
        DatasetSpec.from_dict({"name": "monuseg", "label": "points"}, TYPES)
    with pytest.raises(ConfigError, match="name must be"):
        DatasetSpec.from_dict({"name": "kumar"}, TYPES)
    with pytest.raises(ConfigError, match="not crchisto classes"):  # a typo would silently mask a type
        DatasetSpec.from_dict({"name": "crchisto", "classes": {"epithelium": "Epithelial"}}, TYPES)
    with pytest.raises(ConfigError, match="it has no classes"):
        DatasetSpec.from_dict({"name": "monuseg", "classes": {"nucleus": "Epithelial"}}, TYPES)
    spec = DatasetSpec.from_dict({"name": "crchisto", "classes": {"others": "Inflammatory"}, "share": 0.4}, TYPES)
    assert spec.labels == "points" and spec.share == 0.4
    assert spec.class_lookup(("epithelial", "others"), TYPES).tolist() == [-1, -1, 2]


def test_the_relation_weight_scales_the_loss_whatever_the_batch_holds() -> None:
    """A batch of untyped nuclei with relational targets only: the loss is proportional to the weight."""
    inst, _ = _crop()
    untyped = np.full(3, -1, np.int64)
    rel = {GENERIC_LABEL: np.array([0.5, 0.25, 0.125])}
    logits = torch.zeros(1, 3, 6, 6)
    nucleus = torch.from_numpy(inst > 0)[None]
    losses = []
    for w in (0.1, 1.0):
        t, wt = type_targets(inst, untyped, np.ones(inst.shape, np.float32), np.zeros(3, bool), rel, w)
        t[:, inst == 0] = 0.5  # background at p = 0.5: its BCE is the same for both weights
        losses.append(tp_bce(logits, torch.from_numpy(t)[None], torch.from_numpy(wt)[None], nucleus))
    bg = float(torch.nn.functional.binary_cross_entropy_with_logits(torch.zeros(()), torch.tensor(0.5)))
    assert float(losses[1]) - bg == pytest.approx(10 * (float(losses[0]) - bg), rel=1e-5)


def test_point_classes_map_to_types_and_unknown_ids_are_unknown() -> None:
    spec = DatasetSpec(name="crchisto", labels="points", classes={"epithelial": "Epithelial", "others": "Inflammatory"})
    src = TrainingSource(spec, [], spec.class_lookup(("epithelial", "fibroblast", "inflammatory", "others"), TYPES))
    img = np.zeros((8, 8, 3), np.uint8)
    crop = Sample(name="c", image=img, points=np.zeros((5, 2)), point_classes=np.array([1, 4, 0, 2, 9]), mpp=0.5)
    assert src.instance_types(crop).tolist() == [-1, 0, 2, -1, -1, -1]
    no_classes = Sample(name="c", image=img, points=np.zeros((3, 2)), mpp=0.5)
    assert src.instance_types(no_classes).tolist() == [-1, -1, -1, -1]
