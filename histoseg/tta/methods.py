"""Per-slide test-time adaptation methods on one interface (design.md section 6).

Every method takes the source network, its card and a few tissue crops of the slide (RGB uint8 at the
card's mpp) and returns an ``AdaptResult`` with the adapted state dict (or None when the source weights
are kept) and a JSON-able report. No source image is needed: G2P uses only the statistics in the card.

- ``none``: the source weights.
- ``bn`` (AdaBN): BatchNorm running statistics re-estimated on the slide's crops.
- ``tent``: entropy of the NP (and TP) softmax minimised over BN affine parameters (Adam), after AdaBN.
- ``g2p``: the project's method. The alignment loss is the sum over BN layers of the Gaussian KL between
  the slide's per-channel input statistics and the source statistics; each BN layer's affine parameters
  get a step size proportional to its gradient-to-parameter norm ratio ``||g_l|| / ||theta_l||``
  (normalised by the mean ratio), so layers that the shift pulls hardest relative to their size move most.
  A guard keeps the source weights if the alignment loss does not fall, or if the HV head collapses.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from histoseg.errors import ConfigError, ModelError
from histoseg.models import ModelCard, NucleiNet
from histoseg.tta.stats import bn_layers, capture_bn_inputs, gaussian_kl

METHODS = ("none", "bn", "tent", "g2p")


@dataclass(frozen=True)
class TTASettings:
    method: str = "g2p"
    regions: int = 8  # K tissue crops sampled from the slide
    steps: int = 10
    crop: int = 256
    lr: float = 0.01  # g2p: relative step (fraction of a layer's norm, scaled by its ratio); tent: Adam lr
    guided: bool = True  # g2p: per-layer steps from the gradient-to-parameter ratio (False: uniform)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown adaptation method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.regions < 1 or self.steps < 0:
            raise ConfigError("--tta-regions must be >= 1 and --tta-steps >= 0")


@dataclass
class AdaptResult:
    state: dict[str, torch.Tensor] | None  # None: source weights kept
    report: dict[str, Any] = field(default_factory=dict)


def _batch(images: Sequence[np.ndarray], card: ModelCard) -> torch.Tensor:
    x = torch.from_numpy(np.stack([im[..., :3] for im in images])).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(card.mean).view(1, 3, 1, 1)
    std = torch.tensor(card.std).view(1, 3, 1, 1)
    return (x - mean) / std


def _affine_params(net: nn.Module) -> dict[str, list[nn.Parameter]]:
    out = {}
    for name, m in bn_layers(net).items():
        if m.weight is not None and m.bias is not None:
            out[name] = [m.weight, m.bias]
    return out


def _alignment_loss(
    net: NucleiNet, x: torch.Tensor, source: dict[str, dict[str, list[float]]]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with capture_bn_inputs(net) as st:
        out = net(x)
    total = x.new_zeros(())
    for name, (mu, var) in st.items():
        s = source.get(name)
        if s is None:
            continue
        total = total + gaussian_kl(mu, var, torch.tensor(s["mean"]), torch.tensor(s["var"]))
    return total, out


def _hv_spread(out: dict[str, torch.Tensor]) -> float:
    return float(out["hv"].detach().float().std())


def adapt(net: NucleiNet, card: ModelCard, images: Sequence[np.ndarray], settings: TTASettings) -> AdaptResult:
    """Adapt a copy of ``net`` to ``images`` (crops of one slide); ``net`` itself is not modified."""
    t0 = time.perf_counter()
    base = {"method": settings.method, "regions": len(images), "steps": settings.steps, "crop": settings.crop}
    if settings.method == "none" or not images:
        return AdaptResult(None, {**base, "kept_source": True, "seconds": 0.0})
    torch.manual_seed(settings.seed)
    work = copy.deepcopy(net).float().eval()
    x = _batch(images, card)
    if settings.method == "bn":
        _adabn(work, x)
        rep: dict[str, Any] = {}
    elif settings.method == "tent":
        _adabn(work, x)
        rep = _tent(work, x, settings)
    else:
        if not card.source_stats:
            raise ModelError(f"model {card.name!r} has no source feature statistics in its card: g2p needs them")
        rep = _g2p(work, x, card, settings)
    kept = bool(rep.get("kept_source", False))
    state = None if kept else {k: v.detach().clone() for k, v in work.state_dict().items()}
    return AdaptResult(state, {**base, **rep, "kept_source": kept, "seconds": time.perf_counter() - t0})


@torch.no_grad()
def _adabn(net: nn.Module, x: torch.Tensor) -> None:
    """Running statistics := statistics of the slide's crops (cumulative average over one pass)."""
    for m in bn_layers(net).values():
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for i in range(0, x.shape[0], 4):
        net(x[i : i + 4])
    for m in bn_layers(net).values():
        m.momentum = 0.1
    net.eval()


def _entropy(out: dict[str, torch.Tensor]) -> torch.Tensor:
    ent = _mean_entropy(out["np"])
    if "tp" in out:
        ent = ent + _mean_entropy(out["tp"])
    return ent


def _mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits.float(), dim=1)
    return -(p * torch.log(p.clamp_min(1e-8))).sum(1).mean()


def _tent(net: NucleiNet, x: torch.Tensor, s: TTASettings) -> dict[str, Any]:
    params = [p for ps in _affine_params(net).values() for p in ps]
    for p in net.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=s.lr * 0.1)
    with torch.no_grad():
        before = float(_entropy(net(x)))
    for _ in range(s.steps):
        loss = _entropy(net(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(_entropy(net(x)))
    return {"loss": "entropy", "loss_before": before, "loss_after": after}


def _g2p(net: NucleiNet, x: torch.Tensor, card: ModelCard, s: TTASettings) -> dict[str, Any]:
    groups = _affine_params(net)
    for p in net.parameters():
        p.requires_grad_(False)
    for ps in groups.values():
        for p in ps:
            p.requires_grad_(True)
    source_state = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        loss0, out0 = _alignment_loss(net, x, card.source_stats)
    before, hv0 = float(loss0), _hv_spread(out0)
    ratios: dict[str, float] = {}
    for _ in range(s.steps):
        loss, _ = _alignment_loss(net, x, card.source_stats)
        for ps in groups.values():
            for p in ps:
                p.grad = None
        loss.backward()
        r = {}
        for name, ps in groups.items():
            g = math.sqrt(sum(float((p.grad**2).sum()) for p in ps if p.grad is not None))
            t = math.sqrt(sum(float((p.detach() ** 2).sum()) for p in ps)) + 1e-12
            r[name] = g / t
        mean_r = sum(r.values()) / max(1, len(r)) + 1e-12
        with torch.no_grad():
            for name, ps in groups.items():
                scale = (r[name] / mean_r) if s.guided else 1.0
                gnorm = math.sqrt(sum(float((p.grad**2).sum()) for p in ps if p.grad is not None)) + 1e-12
                tnorm = math.sqrt(sum(float((p**2).sum()) for p in ps))
                # move the layer by (lr x scale) of its own norm, along the negative gradient
                step = s.lr * scale * tnorm / gnorm
                for p in ps:
                    if p.grad is not None:
                        p.sub_(step * p.grad)
        ratios = r
    with torch.no_grad():
        loss1, out1 = _alignment_loss(net, x, card.source_stats)
    after, hv1 = float(loss1), _hv_spread(out1)
    kept = False
    reason = ""
    if not after < before:
        kept, reason = True, "alignment loss did not fall"
    elif hv1 < 0.5 * hv0:
        kept, reason = True, f"HV head collapsed (spread {hv0:.3f} -> {hv1:.3f})"
    if kept:
        net.load_state_dict(source_state)
    top = sorted(ratios.items(), key=lambda kv: -kv[1])
    return {
        "loss": "sum over BN layers of Gaussian KL(target || source) of BN inputs",
        "loss_before": before,
        "loss_after": after,
        "hv_spread_before": hv0,
        "hv_spread_after": hv1,
        "guided": s.guided,
        "g2p_ratios": {k: round(v, 6) for k, v in top},
        "kept_source": kept,
        "guard": reason,
    }
