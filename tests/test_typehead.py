"""A type head trained on a frozen trunk (training.typehead): the trunk's maps and adaptation stay exactly those of
the untyped model, the targets and score follow the CRCHisto protocol on hand-built cases, and the recipe runs
end to end on real CRCHisto images."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from histoseg.errors import ConfigError
from histoseg.inference import run_network
from histoseg.models import ModelCard, NetConfig, NucleiNet, load_model, resolve_model
from histoseg.models.network import receptive_radius
from histoseg.training.stats import feature_statistics
from histoseg.training.typecard import with_types
from histoseg.training.typehead import (
    TypeHeadConfig,
    instance_classes,
    train_type_head,
    view,
    weighted_f1,
)
from histoseg.tta import TTASettings, adapt

from .nets import untyped_copy
from .synthetic import random_nuclei, render


def test_context_head_reaches_farther_and_its_card_and_halo_cover_it() -> None:
    """The context head reads stride-16 features, so at some output phases its field reaches 3 px beyond the
    NP/HV heads' (111 against 108 px, every phase measured: ``receptive_radius``). The typed card records the
    larger radius, and the halo derived from it is still the untyped model's 192 px: adding the head leaves
    the regions, and so the exactness at their borders, as they were."""
    for width in (8, 32):
        plain = receptive_radius(NetConfig(width=width))
        assert (plain, receptive_radius(NetConfig(width=width, n_types=4, type_head="context"))) == (108, 111)
    shipped = resolve_model("default").card()
    trunk = replace(shipped, net=replace(shipped.net, n_types=0), context_radius_px=108, class_names=("Nucleus",))
    typed = with_types(TypeHeadConfig(), trunk)
    assert typed.net.type_head == "context" and typed.context_radius_px == 111
    assert typed.halo_px() == trunk.halo_px() == 192
    with pytest.raises(ValueError, match="type_head"):
        NetConfig(n_types=4, type_head="wide")


def test_a_typed_trunk_is_typed_as_its_untyped_record() -> None:
    """Giving a frozen-trunk typed model a new head (the shipped recipe run again on the shipped ``lite``, whose
    config names it as the trunk) makes the card its untyped trunk gives: the old head's description, recipe
    step, type weights and typing figures are replaced, not stacked; its segmentation figures stay."""
    from histoseg.training.typehead import load_type_head_config

    shipped = resolve_model("lite").card()
    cfg = load_type_head_config(Path(__file__).resolve().parents[1] / "configs" / "lite-types.yaml")
    assert cfg is not None and cfg.trunk == "lite"
    again = with_types(cfg, shipped)
    assert again.description == shipped.description and again.description.count(" Types (") == 1
    assert again.training["recipe"] == shipped.training["recipe"] and again.training["recipe"].count("type head") == 1
    assert again.training["type_head"]["config"] == shipped.training["type_head"]["config"]
    assert "type_weights_fit" not in again.training and again.type_weights is None
    assert "crchisto_typing" not in again.metrics and again.metrics["monuseg_test"] == shipped.metrics["monuseg_test"]
    assert (again.license, again.context_radius_px, again.source_stats) == (
        shipped.license, shipped.context_radius_px, shipped.source_stats
    )
    typed = resolve_model("typed").card()  # typed end to end: its typing figures and type-weight fit go too
    assert "crchisto_typing" in typed.metrics and "type_weights_fit" in typed.training
    headed = with_types(cfg, typed)
    assert "crchisto_typing" not in headed.metrics and "type_weights_fit" not in headed.training


def test_views_are_the_eight_dihedral_transforms() -> None:
    a = np.arange(12).reshape(3, 4)
    got = [view(a, k) for k in range(8)]
    want = [m for b in (a, a.T) for m in (b, b[:, ::-1], b[::-1], b[::-1, ::-1])]
    assert sorted(g.tobytes() + bytes(g.shape) for g in got) == sorted(w.tobytes() + bytes(w.shape) for w in want)
    assert len({g.tobytes() + bytes(g.shape) for g in got}) == 8
    rgb = np.arange(24).reshape(2, 4, 3)  # an image keeps its channels last
    assert view(rgb, 4).shape == (4, 2, 3) and np.array_equal(view(rgb, 4)[:, :, 1], rgb[:, :, 1].T)


def test_instance_classes_follow_the_matched_points() -> None:
    labels = np.zeros((40, 40), np.int32)
    labels[2:8, 2:8] = 1  # centroid (4.5, 4.5)
    labels[20:26, 20:26] = 2  # centroid (22.5, 22.5)
    labels[30:36, 2:8] = 3  # centroid (4.5, 32.5)  (x, y)
    points = np.array([[5.0, 5.0], [22.0, 23.0], [4.5, 32.5], [38.0, 38.0]])
    classes = np.array([2, 3, 0, 1])  # nucleus 3's point has no class; the last point matches nothing
    out = instance_classes(labels, points, classes, radius_px=3.0)
    assert out.tolist() == [0, 2, 3, 0]
    # one-to-one: two classified points on one nucleus give it the nearer one's class only
    two = instance_classes(labels, np.array([[4.0, 4.0], [4.6, 4.6]]), np.array([1, 4]), radius_px=3.0)
    assert two.tolist() == [0, 4, 0, 0]


def test_weighted_f1_known_answer() -> None:
    truth = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    # class 0: tp 2 fp 0 fn 1 -> 0.8; class 1: tp 1 fp 1 fn 1 -> 0.5; class 2: tp 1 fp 1 fn 0 -> 2/3
    want = (3 * 0.8 + 2 * 0.5 + 1 * (2 / 3)) / 6
    assert weighted_f1(truth, pred, 3) == pytest.approx(want)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"trunk": "default", "epochs": 3}, "unknown type-head config keys"),
        ({"trunk": "default", "classes": {"tumour": "Epithelial"}}, "not CRCHisto classes"),
        ({"trunk": "default", "types": ["A"], "classes": {"epithelial": "B"}}, "not listed in types"),
        ({"trunk": "default", "views": 9}, "views must be 1..8"),
        ({"trunk": "default", "limit": 1}, "limit must be >= 2"),
    ],
)
def test_config_errors_are_one_clear_line(data: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TypeHeadConfig.from_dict(data)


def _shifted(n: int = 3) -> list[np.ndarray]:
    out = []
    for i in range(n):
        img = render(random_nuclei((64, 64), 20, seed=i), seed=i).astype(np.float32)
        img[..., 0] *= 0.6
        img[..., 2] = img[..., 2] * 0.6 + 255 * 0.4
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def test_g2p_adapts_the_trunk_of_a_frozen_trunk_typed_model_as_the_untyped_one() -> None:
    """The head has no source statistics and gets no alignment gradient; counting its layers among those g2p
    ranks would change which trunk layers move. So the typed model's trunk moves exactly as the untyped one's."""
    torch.manual_seed(0)
    plain = NucleiNet(NetConfig(width=8)).eval()
    card = ModelCard(name="t", net=plain.cfg, mpp=0.5, context_radius_px=1)
    with torch.no_grad():
        plain.train()
        for img in _shifted(4):
            plain((torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0 - 0.5) / 0.25)
        plain.eval()
    card.source_stats = feature_statistics(plain, card, [render(random_nuclei((64, 64), 20, seed=9), seed=9)])
    typed_cfg = NetConfig(width=8, n_types=3, type_head="context")
    typed = NucleiNet(typed_cfg).eval()
    missing, _ = typed.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all(k.startswith("tp_head.") for k in missing)
    typed_card = replace(card, net=typed_cfg, class_names=("A", "B", "C"), class_colors=((1, 2, 3),) * 3)
    st = TTASettings(method="g2p", gate=0.0, min_view_gain=None)
    a = adapt(plain, card, _shifted(), st)
    b = adapt(typed, typed_card, _shifted(), st)
    assert a.state is not None and b.state is not None and not a.report["kept_source"]
    assert a.report["moved_layers"] == b.report["moved_layers"]
    for k, v in a.state.items():
        torch.testing.assert_close(b.state[k], v, rtol=0, atol=0)


def test_trained_head_keeps_the_trunk_maps_to_the_bit(shared_data: Path, tmp_path: Path) -> None:
    """The recipe end to end on three real CRCHisto training images (a few steps), on an untyped copy of the
    ``lite`` trunk (another architecture than the default's): the artifact's NP/HV maps are the trunk's to the
    bit, it has four type maps, its card keeps the trunk's statistics, halo and thresholds, and the run is
    deterministic."""
    from histoseg.datasets import load_crchisto
    from histoseg.training.evaluate import model_grid
    from histoseg.training.ship import render_card

    trunk = untyped_copy("lite", tmp_path)
    cfg = TypeHeadConfig.from_dict(
        {"trunk": str(trunk), "name": "t", "output": str(tmp_path / "a"), "iterations": 4, "val_every": 2,
         "views": 2, "limit": 3, "hold_every": 3}
    )
    path = train_type_head(cfg, progress=False)
    again = train_type_head(replace(cfg, output=str(tmp_path / "b")), progress=False)
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(again.read_bytes()).digest()
    trunk_net, trunk_card = load_model(resolve_model(str(trunk)))
    net, card = load_model(resolve_model(str(path)))
    assert card.net.n_types == 4 and card.net.type_head == "context"
    assert card.class_names == ("Epithelial", "Fibroblast", "Inflammatory", "Other")
    assert card.source_stats == trunk_card.source_stats and card.postprocess == trunk_card.postprocess
    assert card.halo_px() == trunk_card.halo_px() and card.type_weights is not None and len(card.type_weights) == 4
    assert "CRCHisto" in card.license and len(card.training["type_head"]["held_out"]) == 1
    text = render_card(card)  # the human-readable card names the head's data and class mapping
    assert "- crchisto: classified points, the type head only (trunk frozen); classes: epithelial -> Epithelial" in text
    assert "Type head (trunk frozen): CRCHisto training set (70 images" in text and "1 of its images held out" in text
    assert "type head only;" not in text  # the head's data is named once, not "Type head: ...: type head only"
    assert "share None" not in text and "configs/t-types.yaml" in text
    img = model_grid(load_crchisto("validation", None)[0], card)
    np0, hv0, tp0 = run_network(trunk_net, trunk_card, img)
    np1, hv1, tp1 = run_network(net, card, img)
    assert tp0 is None and tp1 is not None and tp1.stride == 4 and tp1.full(*np1.shape).shape == (4, *np1.shape)
    assert np.array_equal(np0, np1) and np.array_equal(hv0, hv1)
    assert 0.0 < float(tp1.prob.min()) and float(tp1.prob.max()) < 1.0


def test_train_command_reads_a_trunk_config_as_a_type_head(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``histoseg train --config`` dispatches on the file: one naming a ``trunk`` is a type-head config, whose own
    errors (a bad key, a non-mapping file, ``--device cuda``) are one line and a non-zero exit, before any work."""
    from histoseg.cli.main import main

    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("trunk: default\nepochs: 3\n")
    listed = tmp_path / "b.yaml"
    listed.write_text("- trunk\n")
    good = tmp_path / "c.yaml"
    good.write_text(f"trunk: default\noutput: {tmp_path / 'out'}\n")
    for args, message in (
        (["--config", str(bad_key)], "unknown type-head config keys"),
        (["--config", str(listed)], "must be a mapping"),
        (["--config", str(good), "--device", "cuda"], "trains on the CPU"),
    ):
        assert main(["train", *args]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()
