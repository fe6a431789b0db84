"""Test-time adaptation methods behave as specified on a small network with known statistics."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from histoseg.errors import ConfigError
from histoseg.models import ModelCard, NetConfig, NucleiNet
from histoseg.models.bnstats import bn_layers, capture_bn_inputs
from histoseg.training.stats import feature_statistics
from histoseg.tta import TTASettings, adapt
from histoseg.tta.g2p import ENCODER_PREFIXES, AlignmentLoss

from .synthetic import random_nuclei, render


def _images(shift: float, n: int = 4, seed: int = 0) -> list[np.ndarray]:
    out = []
    for i in range(n):
        lab = random_nuclei((64, 64), 20, seed=seed + i)
        img = render(lab, seed=i).astype(np.float32)
        img[..., 0] *= 1.0 - shift  # a stain shift: less red, more blue
        img[..., 2] = img[..., 2] * (1.0 - shift) + 255 * shift
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def model() -> tuple[NucleiNet, ModelCard]:
    torch.manual_seed(0)
    net = NucleiNet(NetConfig(width=8)).eval()
    card = ModelCard(name="t", net=net.cfg, mpp=0.5, context_radius_px=1)
    # give BN layers non-trivial running statistics, as training would
    with torch.no_grad():
        net.train()
        for img in _images(0.0, 8, seed=10):
            x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0
            net((x - 0.5) / 0.25)
        net.eval()
    card.source_stats = feature_statistics(net, card, _images(0.0, 8, seed=10))
    return net, card


def test_none_keeps_source(model: tuple[NucleiNet, ModelCard]) -> None:
    net, card = model
    res = adapt(net, card, _images(0.4), TTASettings(method="none"))
    assert res.state is None and res.report["kept_source"]


def test_adabn_running_stats_equal_slide_statistics(model: tuple[NucleiNet, ModelCard]) -> None:
    net, card = model
    imgs = _images(0.4)
    res = adapt(net, card, imgs, TTASettings(method="bn", guard=False))
    assert res.state is not None
    first = next(iter(bn_layers(net)))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
    x = (x - 0.5) / 0.25
    with torch.no_grad(), capture_bn_inputs(net) as st:
        net(x)
    mean, _ = st[first]
    torch.testing.assert_close(res.state[f"{first}.running_mean"], mean, atol=1e-4, rtol=1e-4)
    # the caller's network is untouched
    assert not torch.allclose(net.state_dict()[f"{first}.running_mean"], mean, atol=1e-3)


def test_g2p_reduces_alignment_loss_under_shift(model: tuple[NucleiNet, ModelCard]) -> None:
    net, card = model
    st = TTASettings(
        method="g2p", steps=10, lr=0.001, gate=0.0, tolerance=1.0, params="bn", layers="encoder", min_view_gain=None
    )  # the mechanics of the steps; the guard's checks are tested below
    res = adapt(net, card, _images(0.4), st)
    r = res.report
    assert r["loss_after"] < r["loss_before"] and r["shift_score"] > 0
    assert res.state is not None and not r["kept_source"]
    assert set(r["g2p_ratios"]) == set(bn_layers(net))
    # only the encoder's statistics are aligned: decoder and head BN layers get no gradient and stay as they were
    decoder = [k for k in r["g2p_ratios"] if not k.startswith(ENCODER_PREFIXES)]
    assert decoder and all(r["g2p_ratios"][k] == 0 for k in decoder)
    assert any(r["g2p_ratios"][k] > 0 for k in r["g2p_ratios"] if k.startswith(ENCODER_PREFIXES))
    for k in decoder:
        torch.testing.assert_close(res.state[f"{k}.weight"], net.state_dict()[f"{k}.weight"])
    # the kept iterate is the best one seen, and guided and uniform steps differ
    assert r["loss_after"] == pytest.approx(min(r["loss_history"]), rel=1e-5)
    u = adapt(net, card, _images(0.4), replace(st, guided=False))
    assert u.report["loss_after"] != pytest.approx(r["loss_after"])


def test_alignment_loss_known_values() -> None:
    one = {"l": {"mean": [0.0], "var": [1.0], "slide_mean": [0.0], "slide_mean_sd": [1.0],
                 "slide_logvar": [float(np.log(1 + 1e-5))], "slide_logvar_sd": [1.0]}}
    z = AlignmentLoss(one, "z", tolerance=1.0)
    sd = 1.0 + 0.05 + 1e-3  # the source spread plus its floor
    # three standard deviations off in the mean, variance on target: 0.5 * (3 - 1)^2
    assert float(z.layer("l", torch.tensor([3 * sd]), torch.tensor([1.0]))) == pytest.approx(2.0, rel=1e-5)
    assert float(z.layer("l", torch.tensor([0.9 * sd]), torch.tensor([1.0]))) == 0.0  # within tolerance
    assert z.layer("other", torch.tensor([0.0]), torch.tensor([1.0])) is None
    kl = AlignmentLoss(one, "kl", tolerance=0.0)
    # KL(N(1, 1) || N(0, 1)) = 1/2
    assert float(kl.layer("l", torch.tensor([1.0]), torch.tensor([1.0]))) == pytest.approx(0.5, rel=1e-4)


def test_source_slides_cost_nothing_and_are_not_adapted(model: tuple[NucleiNet, ModelCard]) -> None:
    net, card = model
    # each source image's own statistics lie within (n-1)/sqrt(n) < 3 sample SDs of the n=8 source images
    for img in _images(0.0, 8, seed=10):
        res = adapt(net, card, [img], TTASettings(method="g2p", tolerance=3.0, gate=0.0, layers="all"))
        assert res.report["loss_before"] == 0.0
        assert res.state is None and res.report["guard"] == "no shift detected (loss within the gate)"
        assert len(res.report["loss_history"]) == 1  # one forward pass, no steps


def test_g2p_gate_and_guard_keep_source(model: tuple[NucleiNet, ModelCard]) -> None:
    net, card = model
    gated = adapt(net, card, _images(0.4), TTASettings(method="g2p", gate=1e9))
    assert gated.state is None and gated.report["guard"].startswith("no shift detected")
    res = adapt(net, card, _images(0.4), TTASettings(method="g2p", steps=0, gate=0.0))
    assert res.state is None and res.report["guard"] == "alignment loss did not fall"
    # steps far too large: every iterate is worse than the source, which is kept
    wild = adapt(net, card, _images(0.4), TTASettings(method="g2p", steps=3, lr=50.0, gate=0.0, tolerance=0.0))
    assert wild.state is None and wild.report["guard"] == "alignment loss did not fall"
    h = wild.report["loss_history"]
    assert len(h) > 1 and not any(v is not None and v < h[0] for v in h[1:])


def test_g2p_can_update_every_layer(model: tuple[NucleiNet, ModelCard]) -> None:
    net, card = model
    st = TTASettings(method="g2p", steps=5, lr=0.001, gate=0.0, params="all", layers="all")
    res = adapt(net, card, _images(0.4), st)
    assert res.state is not None
    convs = [k for k, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert set(convs) <= set(res.report["g2p_ratios"])
    changed = [k for k in convs if not torch.equal(res.state[f"{k}.weight"], net.state_dict()[f"{k}.weight"])]
    assert len(changed) > len(convs) // 2


def test_tent_lowers_entropy_and_g2p_needs_stats(model: tuple[NucleiNet, ModelCard]) -> None:
    net, card = model
    res = adapt(net, card, _images(0.4), TTASettings(method="tent", steps=5, tent_lr=0.005))
    assert res.report["loss_after"] < res.report["loss_before"]
    bare = ModelCard(name="bare", net=net.cfg, mpp=0.5)
    from histoseg.errors import ModelError

    with pytest.raises(ModelError, match="source feature statistics"):
        adapt(net, bare, _images(0.4), TTASettings(method="g2p"))
    with pytest.raises(ConfigError):
        TTASettings(method="magic")
    with pytest.raises(ConfigError):
        TTASettings(loss="l2")
    # a card from before per-slide statistics: the z loss says why, the plain KL still works
    old = ModelCard(name="old", net=net.cfg, mpp=0.5,
                    source_stats={k: {"mean": v["mean"], "var": v["var"]} for k, v in card.source_stats.items()})
    with pytest.raises(ModelError, match="per-slide source statistics"):
        adapt(net, old, _images(0.4), TTASettings(method="g2p", gate=0.0))
    assert adapt(net, old, _images(0.4), TTASettings(method="g2p", loss="kl", gate=0.0, steps=3)).state is not None


def test_head_guard_checks_all_three_heads() -> None:
    from histoseg.tta.guard import collapsed as _collapsed

    h0 = {"hv_spread": 0.4, "np_fraction": 0.2, "tp_entropy": 1.0}
    assert _collapsed(h0, {"hv_spread": 0.35, "np_fraction": 0.3, "tp_entropy": 0.9}) == ""
    assert _collapsed(h0, {**h0, "hv_spread": 0.1}).startswith("HV head collapsed")
    assert _collapsed(h0, {**h0, "np_fraction": 0.9}).startswith("NP head collapsed")
    assert _collapsed(h0, {**h0, "np_fraction": 0.0005}).startswith("NP head collapsed")
    assert _collapsed(h0, {**h0, "tp_entropy": 0.2}).startswith("TP head collapsed")


def test_top_ratio_layers_move_and_the_others_stay(model: tuple[NucleiNet, ModelCard]) -> None:
    net, card = model
    st = TTASettings(method="g2p", steps=4, lr=0.001, gate=0.0, params="top", top=0.25, guard=False)
    res = adapt(net, card, _images(0.4), st)
    assert res.state is not None
    r = res.report["g2p_ratios"]  # every conv and BN layer, ranked by its ratio at the source weights
    moved = res.report["moved_layers"]
    assert len(moved) == -(-len(r) // 4)  # ceil(25% of the layers)
    assert set(moved) == set(sorted(r, key=lambda k: (-r[k], k))[: len(moved)])
    src = net.state_dict()
    for name in r:
        same = torch.equal(res.state[f"{name}.weight"], src[f"{name}.weight"])
        assert same == (name not in moved), name


def test_plausibility_bounds_known_answers() -> None:
    from histoseg.tta.guard import Census, implausible, ratios

    src = Census(count=99, median_area=79.0)
    assert ratios(src, Census(99, 79.0)) == (1.0, 1.0)
    assert implausible(src, Census(119, 85.0), (0.8, 1.25), (0.8, 1.25)) == ""  # x1.2 count, x1.075 area
    assert implausible(src, Census(199, 79.0), (0.8, 1.25), (0.8, 1.25)).startswith("nucleus count")  # x2
    assert implausible(src, Census(69, 79.0), (0.8, 1.25), (0.8, 1.25)).startswith("nucleus count")  # x0.7
    assert implausible(src, Census(99, 55.0), (0.8, 1.25), (0.8, 1.25)).startswith("median nucleus area")
    assert implausible(Census(0, 0.0), Census(0, 0.0), (0.8, 1.25), (0.8, 1.25)) == ""  # nothing found twice
    with pytest.raises(ConfigError):
        TTASettings(count_bounds=(1.1, 1.5))


def _stained(h_od: np.ndarray) -> np.ndarray:
    """An RGB crop whose hematoxylin optical density is ``h_od`` (eosin 0.2 everywhere): colour deconvolution
    run backwards with the same H&E vectors as ``postprocess.hematoxylin``."""
    from histoseg.postprocess.instances import _HED

    od = h_od[..., None] * _HED[0] + 0.2 * _HED[1]
    return np.clip(255.0 * np.exp(-od), 0, 255).astype(np.uint8)


def test_changed_nuclei_contrast_on_a_hand_built_crop() -> None:
    """Added nuclei on stroma score ~0, added nuclei as dark as the kept ones ~1; removed ones likewise; no
    change scores 1 (nothing to judge); the rule rejects pale additions and dark removals."""
    from histoseg.tta.guard import changed_nuclei, unlike_nuclei

    h = np.full((64, 64), 0.1)  # stroma
    h[:, 56:] = 0.0  # no hematoxylin: eosin only, still tissue
    h[4:12, 4:12] = h[4:12, 30:38] = h[40:48, 4:12] = 1.0  # three dark nuclei
    crop = _stained(h)
    before = np.zeros((64, 64), np.int32)
    before[4:12, 4:12], before[4:12, 30:38] = 1, 2
    same = changed_nuclei([before], [before], [crop])
    assert same["added"] == same["removed"] == 0 and np.isnan(same["z_added"]) and np.isnan(same["z_removed"])
    assert unlike_nuclei(same, 0.4, 0.7) == ""
    pale = before.copy()
    pale[20:28, 20:28] = 3  # on stroma
    got = changed_nuclei([before], [pale], [crop])
    assert got["added"] == 1 and abs(got["z_added"]) < 0.05
    assert unlike_nuclei(got, 0.4, None).startswith("the 1 nuclei added have stain contrast")
    dark = before.copy()
    dark[40:48, 4:12] = 3  # the third real nucleus, missed by the source
    got = changed_nuclei([before], [dark], [crop])
    assert got["added"] == 1 and abs(got["z_added"] - 1.0) < 0.05 and unlike_nuclei(got, 0.4, None) == ""
    lost = before.copy()
    lost[lost == 2] = 0
    got = changed_nuclei([before], [lost], [crop])
    assert got["removed"] == 1 and abs(got["z_removed"] - 1.0) < 0.05
    assert unlike_nuclei(got, 0.4, 0.7).startswith("the 1 nuclei removed") and unlike_nuclei(got, 0.4, None) == ""


def test_mirror_agreement_known_answers() -> None:
    from histoseg.tta.guard import less_consistent, mirror_agreement

    p = np.zeros((4, 6), np.float32)
    p[1:3, 0:2] = 0.9  # 4 nucleus pixels at the left edge
    same = p.copy()
    shifted = np.zeros_like(p)
    shifted[1:3, 1:3] = 0.8  # 2 of its 4 pixels overlap: IoU 2 / 6
    assert mirror_agreement(p, [same, shifted, np.zeros_like(p)]) == pytest.approx([1.0, 1 / 3, 0.0])
    assert mirror_agreement(np.zeros_like(p), [np.zeros_like(p)]) == [1.0]  # nothing in either view: agree
    # the views the guard compares come back in the crop's frame: a pixel-wise "network" agrees with itself
    from histoseg.inference.views import view_maps

    rgb = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)

    def pixelwise(im: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
        return im[..., 0] / 255.0, np.zeros((2, *im.shape[:2]), np.float32), None

    identity, *mirrored = view_maps(pixelwise, rgb, 4)
    assert len(mirrored) == 3 and identity[0].shape == (40, 56)
    for maps in mirrored:
        np.testing.assert_array_equal(maps[0], identity[0])
    assert mirror_agreement(identity[0], [m[0] for m in mirrored]) == [1.0, 1.0, 1.0]
    assert less_consistent(0.70, 0.72, 0.015) == ""
    assert less_consistent(0.70, 0.71, 0.015).startswith("mirror-view agreement 0.700 -> 0.710")
    assert less_consistent(0.70, 0.60, None) == ""
    with pytest.raises(ConfigError):
        TTASettings(min_view_gain=2.0)


def test_guard_rejects_a_real_adaptation_that_multiplies_nuclei(shared_data: Path) -> None:
    """AdaBN on a CRCHisto image (colorectal, 20x) finds far more nuclei than the source model on the same crops
    (fibres and debris taken for nuclei); the guard keeps the source weights and says why."""
    from histoseg.models import load_model, resolve_model
    from histoseg.training.evaluate import load_dataset, model_grid

    net, card = load_model(resolve_model("default"))
    s = load_dataset("crchisto-val")[0]
    img = model_grid(s, card)
    crops = [np.ascontiguousarray(img[y : y + 256, x : x + 256]) for y in (0, 256) for x in (0, 256)]
    raw = adapt(net, card, crops, TTASettings(method="bn", guard=False))
    assert raw.state is not None and "census" not in raw.report
    res = adapt(net, card, crops, TTASettings(method="bn"))
    c = res.report["census"]
    assert c["count_ratio"] > 1.25 and c["count_after"] > c["count_before"] > 20
    assert res.state is None and res.report["kept_source"]
    assert res.report["guard"].startswith("nucleus count changed implausibly")
    # the stain check alone also rejects it: the nuclei added are much paler than the ones both models find
    loose = adapt(net, card, crops, TTASettings(method="bn", count_bounds=(0.5, 3.0)))
    assert loose.state is None and loose.report["census"]["added_contrast"] < 0.5
    assert loose.report["guard"].startswith(f"the {loose.report['census']['added']} nuclei added have stain contrast")


def test_type_distribution_reads_independent_sigmoids_over_nuclei() -> None:
    """The type head has one sigmoid per type and no background channel: the adaptation's type entropy and
    the guard's class mix normalise the sigmoids over the types and weight pixels by nucleus probability."""
    from histoseg.tta.guard import heads, type_distribution

    tp = torch.full((1, 3, 4, 4), -6.0)
    tp[0, 0, :2] = 4.0  # nucleus pixels of type 0
    tp[0, 2, 2:] = 4.0  # background pixels where type 2 fires (no nucleus there)
    np_logits = torch.zeros(1, 2, 4, 4)
    np_logits[0, 1, :2], np_logits[0, 0, 2:] = 8.0, 8.0
    out = {"np": np_logits, "hv": torch.zeros(1, 2, 4, 4), "tp": tp}
    q, w = type_distribution(out)
    assert torch.allclose(q.sum(1), torch.ones(1, 4, 4))
    assert float(w[0, :2].min()) > 0.99 and float(w[0, 2:].max()) < 0.01
    assert heads(out)["tp_entropy"] < 0.2  # nuclei are all type 0; the background's type 2 does not count
