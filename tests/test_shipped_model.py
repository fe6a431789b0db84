"""The shipped default model reproduces its card's MoNuSeg-test figures (catches silent breakage of
weight loading, input normalisation or post-processing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from histoseg.datasets import load_monuseg
from histoseg.metrics import evaluate_instances
from histoseg.models import load_model, registered_models, resolve_model
from histoseg.training.evaluate import RADIUS_UM, predict_native


def test_default_is_registered_with_a_complete_card() -> None:
    assert "default" in registered_models()
    card = resolve_model("default").card()
    assert card.mpp > 0 and card.context_radius_px > 0 and card.max_nucleus_um > 0
    assert "CC BY-NC-SA 4.0" in card.license
    assert card.source_stats, "source feature statistics for adaptation are missing"
    bn_layers = [k for k in card.source_stats]
    assert all(len(card.source_stats[k]["mean"]) == len(card.source_stats[k]["var"]) for k in bn_layers)
    # per-slide statistics for g2p's standardised alignment loss (``--tta auto`` needs them)
    fields = ("slide_mean", "slide_mean_sd", "slide_logvar", "slide_logvar_sd")
    assert all(len(card.source_stats[k][f]) == len(card.source_stats[k]["mean"]) for k in bn_layers for f in fields)
    assert "monuseg_test" in card.metrics


@pytest.mark.parametrize("name", sorted(registered_models()))
def test_shipped_cards_give_each_network_its_whole_receptive_field(name: str) -> None:
    """The halo is derived from the card's radius, so the radius must be the network's whole field, every
    output phase included (``receptive_radius``): a smaller one would let region borders change outputs."""
    from histoseg.models import receptive_radius

    card = resolve_model(name).card()
    assert card.context_radius_px == receptive_radius(card.net)
    assert card.halo_px() >= card.context_radius_px + card.max_nucleus_um / card.mpp


@pytest.mark.parametrize("name", ["default", "lite"])
def test_shipped_models_reach_card_segmentation_on_two_monuseg_test_images(name: str, shared_data: Path) -> None:
    """``default`` and the opt-in ``lite`` (the cheaper architecture, issue 13) reproduce their cards' figures
    (``default``'s are its untyped trunk's: the type head cannot change the segmentation)."""
    net, card = load_model(resolve_model(name))
    per_image = card.metrics["monuseg_test"]["per_image"]
    samples = load_monuseg("test", None, root=shared_data / "nuclei" / "monuseg2018")[:2]
    for s in samples:
        assert s.inst is not None
        got = evaluate_instances(s.inst, predict_native(net, card, s), s.mpp, RADIUS_UM["monuseg-test"])
        want = per_image[s.name]
        assert got["pq"] == pytest.approx(want["pq"], abs=0.02), s.name
        assert got["aji"] == pytest.approx(want["aji"], abs=0.02), s.name
        assert got["dice"] == pytest.approx(want["dice"], abs=0.02), s.name


@pytest.mark.parametrize("name", ["default", "lite", "typed"])
def test_typed_models_reach_their_card_typing_on_crchisto_validation(name: str, shared_data: Path) -> None:
    """The shipped typed models (issue 14): ``default`` and the opt-in ``lite`` (each a type head on its untyped
    trunk, frozen) and the opt-in ``typed`` (trained end to end). Each card lists the types, the datasets and
    their licences, and the file reproduces the card's CRCHisto-validation figures (all 10 images, never trained
    on)."""
    from histoseg.training.evaluate import score_typing

    assert name in registered_models()
    net, card = load_model(resolve_model(name))
    assert card.class_names == ("Epithelial", "Fibroblast", "Inflammatory", "Other") and card.net.n_types == 4
    assert "research use" in card.license and card.type_weights is not None
    if name == "typed":
        assert "CRCHisto" in card.training["data"]
        datasets = {d["name"]: d for d in card.training["config"]["datasets"]}
        assert set(datasets) == {"monuseg", "crchisto"} and datasets["crchisto"]["labels"] == "points"
    else:
        assert card.net.type_head == "context" and "CRCHisto" in card.training["type_head"]["data"]
    want = card.metrics["crchisto_typing"]
    got = score_typing(net, card)
    assert got["det_f1"] == pytest.approx(want["det_f1"], abs=0.01)
    assert got["weighted_f1"] == pytest.approx(want["weighted_f1"], abs=0.01)
    assert got["weighted_f1"] > 0.5  # far above chance (about 0.3 for four unbalanced classes)


def test_lite_model_is_the_cheaper_architecture_with_its_own_statistics() -> None:
    """``lite`` is the issue-13 architecture (at most half the default's MACs, counted in test_models) and carries
    source statistics for every BatchNorm layer of its trunk, so per-slide adaptation works with it (the type head,
    trained on the frozen trunk, has none and is left out of adaptation, as the default's)."""
    net, card = load_model(resolve_model("lite"))
    assert (card.net.block, card.net.decoder, card.net.heads) == ("bottleneck", "bottleneck", "shared")
    assert (card.net.n_types, card.net.type_head) == (4, "context")
    bn = [n for n, m in net.named_modules() if type(m).__name__ == "BatchNorm2d" and not n.startswith("tp_head.")]
    assert set(card.source_stats) >= set(bn) and len(bn) == 34
    assert card.training["config"]["teacher"] == "default"
    assert "CC BY-NC-SA 4.0" in card.license
