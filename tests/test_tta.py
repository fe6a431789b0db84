"""Test-time adaptation methods behave as specified on a small network with known statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histoseg.errors import ConfigError
from histoseg.models import ModelCard, NetConfig, NucleiNet
from histoseg.training.stats import feature_statistics
from histoseg.tta import TTASettings, adapt
from histoseg.tta.stats import bn_layers, capture_bn_inputs

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
    res = adapt(net, card, imgs, TTASettings(method="bn"))
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
    res = adapt(net, card, _images(0.4), TTASettings(method="g2p", steps=15, lr=0.02))
    r = res.report
    assert r["loss_after"] < r["loss_before"]
    assert res.state is not None and not r["kept_source"]
    assert set(r["g2p_ratios"]) == set(bn_layers(net))
    assert all(v >= 0 for v in r["g2p_ratios"].values())
    # guided and uniform steps differ
    u = adapt(net, card, _images(0.4), TTASettings(method="g2p", steps=15, lr=0.02, guided=False))
    assert u.report["loss_after"] != pytest.approx(r["loss_after"])


def test_g2p_guard_keeps_source_when_loss_does_not_fall(model: tuple[NucleiNet, ModelCard]) -> None:
    net, card = model
    res = adapt(net, card, _images(0.4), TTASettings(method="g2p", steps=0))
    assert res.state is None and res.report["guard"] == "alignment loss did not fall"


def test_tent_lowers_entropy_and_g2p_needs_stats(model: tuple[NucleiNet, ModelCard]) -> None:
    net, card = model
    res = adapt(net, card, _images(0.4), TTASettings(method="tent", steps=5, lr=0.05))
    assert res.report["loss_after"] < res.report["loss_before"]
    bare = ModelCard(name="bare", net=net.cfg, mpp=0.5)
    from histoseg.errors import ModelError

    with pytest.raises(ModelError, match="source feature statistics"):
        adapt(net, bare, _images(0.4), TTASettings(method="g2p"))
    with pytest.raises(ConfigError):
        TTASettings(method="magic")
