"""A typed card's per-class type weights (issue 14): the decision rule, the card field, the pipeline's use of
it, the fit on hand-built cases with known answers, and the shipped typed model with and without them."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from histoseg.errors import ConfigError, ModelError
from histoseg.metrics import ClassificationTally
from histoseg.metrics.detection import match_points
from histoseg.models import ModelCard, load_model, resolve_model
from histoseg.models.typemap import TypeMap
from histoseg.postprocess import decide_types, instance_centroids, measure_instances
from histoseg.training.evaluate import TypedImage, classify
from histoseg.training.typecal import fit_type_weights, main
from histoseg.types import PlaneInfo

from .nets import untyped_copy

LUT = np.array([0, 1, 2, 3, 4])  # model class k is CRCHisto class k


def test_decide_types_multiplies_the_means_by_the_weights() -> None:
    means = np.array([[0.50, 0.45, 0.10, 0.05], [0.2, 0.1, 0.6, 0.3], [0.3, 0.3, 0.1, 0.2]])
    assert decide_types(means).tolist() == [0, 2, 0]  # plain highest; a tie goes to the first class
    assert decide_types(means, (1.0, 1.2, 1.0, 1.0)).tolist() == [1, 2, 1]  # 0.45 x 1.2 = 0.54 > 0.50
    assert decide_types(means, (1.0, 1.0, 1.0, 2.5)).tolist() == [0, 3, 3]  # 0.3 x 2.5 > 0.6; 0.2 x 2.5 > 0.3
    assert decide_types(means[0], (1.0, 1.0, 1.0, 11.0)) == 3  # one nucleus: a scalar


def test_card_type_weights_round_trip_and_are_validated() -> None:
    net, card = load_model(resolve_model("typed"))
    d = card.to_dict()
    assert ModelCard.from_dict(d).type_weights == card.type_weights and card.type_weights is not None
    plain = replace(card, type_weights=None).to_dict()
    assert "type_weights" not in plain and ModelCard.from_dict(plain).type_weights is None
    for bad, why in (
        ([1.0, 2.0], "list of 4 numbers"),
        ([1.0, 1.0, 1.0, 0.0], "between 0.01 and 100"),
        ([1.0, 1.0, 1.0, "x"], "must be a number"),
    ):
        with pytest.raises(ModelError, match=why):
            ModelCard.from_dict({**d, "type_weights": bad})
    untyped = {**plain, "architecture": {**d["architecture"], "n_types": 0}, "classes": d["classes"][:1]}
    assert ModelCard.from_dict(untyped).net.n_types == 0
    with pytest.raises(ModelError, match="only for a typed model"):
        ModelCard.from_dict({**untyped, "type_weights": [1.0]})


def test_measure_instances_types_nuclei_with_the_card_weights() -> None:
    """Two square nuclei whose mean type probabilities favour class 1 by a little: weights move the first to
    class 4 (its reported probability is then class 4's mean), not the second (class 1 far ahead)."""
    labels = np.zeros((20, 40), np.int32)
    labels[5:12, 5:12] = 1
    labels[5:12, 25:32] = 2
    tp = np.zeros((4, 20, 40), np.float32)
    tp[0, :, :20], tp[3, :, :20] = 0.5, 0.3
    tp[0, :, 20:], tp[3, :, 20:] = 0.9, 0.1
    ids, cyx, slices = instance_centroids(labels)
    plane = PlaneInfo(("A", "B", "C", "D"), ((1, 1, 1),) * 4, 0.5, 1.0, labels.shape)
    image = np.full((20, 40, 3), 128, np.uint8)
    cells = TypeMap(tp, 1)  # one cell a pixel
    args = dict(origin_yx=(0, 0), image=image, np_prob=np.ones((20, 40), np.float32), tp_prob=cells, plane=plane)
    plain = measure_instances(labels, ids, cyx, slices, **args)  # type: ignore[arg-type]
    weighted = measure_instances(labels, ids, cyx, slices, type_weights=(1.0, 1.0, 1.0, 2.0), **args)  # type: ignore[arg-type]
    assert plain.class_ids.tolist() == [1, 1] and weighted.class_ids.tolist() == [4, 1]
    assert weighted.probabilities.tolist() == pytest.approx([0.3, 0.9])


def _image(true_classes: list[int], means: list[list[float]]) -> TypedImage:
    xy = np.array([[10.0 * i, 0.0] for i in range(len(true_classes))])
    return TypedImage("x", xy, np.array(means), xy, np.array(true_classes), 1.0, 1.0, match_points(xy, xy, 1.0))


def test_fit_finds_the_weight_that_separates_an_under_called_class() -> None:
    """Class-2 nuclei score 0.4 on class 2 against 0.6 on class 1, class-1 nuclei 0.9 against 0.1: plainly every
    nucleus is class 1 (class-1 F1 2/3, class-2 F1 0: weighted 1/3); any class-2 weight between 1.5 and 9
    types all of them right (F1 1.0), and the grid's first such log-factor is 0.5 (x1.6487)."""
    im = _image([1, 1, 2, 2], [[0.9, 0.1, 0.0, 0.0]] * 2 + [[0.6, 0.4, 0.0, 0.0]] * 2)
    weights, before, after = fit_type_weights([im], LUT)
    assert before == pytest.approx(1 / 3) and after == 1.0
    assert weights[0] == 1.0 and weights[1] == pytest.approx(np.exp(0.5), abs=1e-4)
    assert classify([im], weights, LUT).weighted_f1 == 1.0


def test_typed_images_rescore_at_another_radius_and_type_an_untyped_model_as_class_1() -> None:
    """Two points, one nucleus 1 px off each: within 1.5 µm (mpp 0.5: 3 px) both match, within 0.25 µm (0.5 px)
    none; an untyped model's nuclei (no means) are its class 1, which LUT maps to CRCHisto class 1."""
    from histoseg.training.evaluate import typing_scores

    pts = np.array([[10.0, 10.0], [40.0, 10.0]])
    xy = pts + [1.0, 0.0]
    im = TypedImage("x", xy, np.zeros((2, 0)), pts, np.array([1, 2]), 0.5, 1.5, match_points(pts, xy, 3.0))
    wide = typing_scores([im], None, LUT)
    assert wide["radius_um"] == 1.5 and wide["det_f1"] == 1.0 and wide["accuracy"] == 0.5
    narrow = typing_scores([im.at_radius(0.25)], None, LUT)
    assert narrow["radius_um"] == 0.25 and narrow["det_f1"] == 0.0
    with pytest.raises(ConfigError, match="different radii"):
        typing_scores([im, im.at_radius(0.25)], None, LUT)


def test_add_match_counts_exactly_as_add() -> None:
    rng = np.random.default_rng(3)
    t, p = rng.uniform(0, 50, (30, 2)), rng.uniform(0, 50, (28, 2))
    tc, pc = rng.integers(0, 5, 30), rng.integers(0, 5, 28)
    a, b = ClassificationTally(classes=(1, 2, 3, 4)), ClassificationTally(classes=(1, 2, 3, 4))
    m = a.add(t, tc, p, pc, 6.0)
    b.add_match(match_points(t, p, 6.0), tc, pc)
    assert a.result() == b.result() and m.tp > 0


def test_shipped_typed_model_predicts_other_only_with_its_weights(shared_data: Path) -> None:
    """On CRCHisto validation (never used for the fit) the plain highest mean never says "Other"; with the
    card's weights it does, and the weighted class F1 is higher."""
    from histoseg.training.evaluate import score_typing

    net, card = load_model(resolve_model("typed"))
    fit = card.training["type_weights_fit"]
    assert card.type_weights == tuple(fit["weights"]) and "CRCHisto training" in fit["data"]
    plain = score_typing(net, replace(card, type_weights=None))
    weighted = score_typing(net, card)
    assert plain["per_class_f1"]["others"] == 0.0 < 0.2 < weighted["per_class_f1"]["others"]
    assert weighted["weighted_f1"] > plain["weighted_f1"] + 0.02
    assert weighted["det_f1"] == plain["det_f1"]  # the weights change types, never detections


def test_typecal_cli_writes_the_fit_into_a_copy_and_refuses_an_untyped_model(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    art = resolve_model("typed")
    shutil.copy(art.weights, tmp_path / "mine.safetensors")
    card = json.loads(art.card_path.read_text())
    card.pop("type_weights")
    (tmp_path / "mine.json").write_text(json.dumps(card))
    assert main([str(tmp_path / "mine.safetensors"), "--limit", "4", "--write"]) == 0
    written = ModelCard.load(tmp_path / "mine.json")
    assert written.type_weights is not None and written.type_weights[0] == 1.0
    assert written.training["type_weights_fit"]["data"].startswith("CRCHisto training set, 4 images")
    assert written.training["type_weights_fit"]["weighted_f1_fitted"] >= written.training["type_weights_fit"][
        "weighted_f1_plain"
    ]
    capsys.readouterr()
    assert main([str(untyped_copy("lite", tmp_path))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no type head" in err[0]
