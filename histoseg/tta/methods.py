"""Per-slide test-time adaptation methods on one interface (design.md section 6).

Every method takes the source network, its card and a few tissue crops of the slide (RGB uint8 at the
card's mpp) and returns an ``AdaptResult`` with the adapted state dict (or None when the source weights
are kept) and a JSON-able report. No source image is needed: G2P uses only the statistics in the card.

- ``none``: the source weights.
- ``bn`` (AdaBN): BatchNorm running statistics re-estimated on the slide's crops.
- ``tent``: entropy of the NP (and TP) softmax minimised over BN affine parameters (Adam), after AdaBN.
- ``g2p``: the project's method, gradient-to-parameter-ratio guided feature alignment.

  *Loss* (``AlignmentLoss``, ``z``): for every BN layer and channel, the slide's input mean and
  log-variance are standardised by their spread over the *source training images* (recorded in the card);
  deviations beyond ``tolerance`` SDs cost their square. Pooled statistics alone are the wrong target: one
  slide's statistics differ from the pooled ones even in-domain (its content differs), and a pooled Gaussian
  KL pulls every slide towards an average slide. The plain KL is kept as ``loss="kl"`` for the ablation.

  *Gate*: the encoder's part of the loss is a shift score (stain and scanner shifts show at the encoder;
  decoder statistics also move with content). Below ``gate`` the slide is taken as in-domain and keeps the
  source weights after one forward pass; in-domain slides are therefore untouched.

  *Steps*: the moving layers (``params``: every conv and BN layer, the ``top`` fraction with the highest
  gradient-to-parameter ratio ``r_l = ||g_l|| / ||theta_l||`` at the source weights, BN affine only, or BN
  statistics re-estimated then BN affine) each move by ``lr x r_l / mean(r)`` of their own norm along the
  negative gradient (``guided=False``: every layer by ``lr``). The iterate with the lowest loss is kept; a
  guard keeps the source weights when no iterate beats it or when a head collapses (``guard.collapsed``).

Every method's result then passes the plausibility check (``guard``, ``TTASettings.guard``): the adapted and
the source model segment the same crops, and an adaptation that changes the nucleus count or median area
beyond ``count_bounds`` / ``area_bounds`` is rejected (the source weights are kept; the census is reported).
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
from histoseg.tta import guard
from histoseg.tta.stats import bn_layers, capture_bn_inputs, gaussian_kl

METHODS = ("none", "bn", "tent", "g2p")
PARAMS = ("all", "top", "bn", "bnstats")  # g2p: which layers may move


@dataclass(frozen=True)
class TTASettings:
    method: str = "g2p"
    regions: int = 4  # K tissue crops sampled from the slide
    steps: int = 10
    crop: int = 256
    lr: float = 0.002  # g2p: relative step (fraction of a layer's norm, scaled by its ratio)
    tent_lr: float = 0.001  # tent: Adam learning rate
    guided: bool = True  # g2p: per-layer steps from the gradient-to-parameter ratio (False: uniform)
    loss: str = "z"  # g2p alignment: "z" (slide-standardised, with tolerance) or "kl" (pooled Gaussian KL)
    tolerance: float = 2.0  # g2p "z": deviations within this many source-slide SDs are not penalised
    # g2p: which layers move: the "top" G2P-ratio layers only (default: no development image loses > 0.02 PQ,
    # benchmarks/tta_dev.py), "all" conv and BN layers, "bn" (BatchNorm affine only) or "bnstats" (BatchNorm
    # statistics re-estimated, then affine only)
    params: str = "top"
    top: float = 0.25  # g2p params="top": fraction of the layers (highest ratio at the source weights) that move
    layers: str = "all"  # g2p: statistics aligned at "all" BN layers, or at the "encoder" ones only
    gate: float = 1.0  # g2p: adapt only when the encoder's initial alignment loss (shift score) exceeds this
    guard: bool = True  # keep the source unless the adapted model's census on the crops is plausible
    count_bounds: tuple[float, float] = (0.8, 1.25)  # guard: allowed ratio of nuclei found (adapted / source)
    area_bounds: tuple[float, float] = (0.8, 1.25)  # guard: allowed ratio of their median area
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown adaptation method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.regions < 1 or self.steps < 0:
            raise ConfigError("--tta-regions must be >= 1 and --tta-steps >= 0")
        if (self.loss not in ("z", "kl") or self.params not in PARAMS or self.layers not in ("encoder", "all")
                or self.tolerance < 0 or self.gate < 0 or not 0 < self.top <= 1):
            raise ConfigError(f"invalid g2p settings: loss={self.loss!r}, params={self.params!r}, "
                              f"layers={self.layers!r}, tolerance={self.tolerance}, gate={self.gate}, top={self.top}")
        for lo, hi in (self.count_bounds, self.area_bounds):
            if not 0 < lo <= 1 <= hi:
                raise ConfigError(f"guard bounds must bracket 1: {self.count_bounds}, {self.area_bounds}")


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


ENCODER_PREFIXES = ("stem", "stages")  # NucleiNet's encoder: where stain and scanner shifts show first
_FLOOR_LOGSD = 0.05  # floors on the source spreads, so a channel that never varied cannot dominate


def has_slide_statistics(source: dict[str, dict[str, list[float]]]) -> bool:
    """Whether a card's source statistics include the per-slide spreads that the ``z`` loss needs."""
    return bool(source) and all("slide_mean_sd" in v for v in source.values())


class AlignmentLoss:
    """Distance between a slide's BN-input statistics and the source's, summed over layers.

    ``z`` (default): per channel, the slide's mean and log-variance are standardised by the spread of those
    figures over the *source slides* (``slide_*`` entries in the card); deviations within ``tolerance``
    standard deviations are free, larger ones cost their square. A source slide therefore costs nothing, and
    channels whose statistics vary with tissue content weigh less than the ones a stain shift moves.
    ``kl``: mean over channels of KL(N(slide) || N(source pooled)), the plain form (for the ablation).
    """

    def __init__(
        self, source: dict[str, dict[str, list[float]]], kind: str, tolerance: float, layers: str = "all"
    ) -> None:
        if kind == "z" and not has_slide_statistics(source):
            raise ModelError("the model card has no per-slide source statistics (re-run training's finalize); "
                             "use the 'kl' alignment loss with this model")
        self.kind, self.tolerance, self.layers = kind, tolerance, layers
        self.src = {k: {f: torch.tensor(v, dtype=torch.float32) for f, v in s.items()} for k, s in source.items()}

    def layer(self, name: str, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor | None:
        s = self.src.get(name)
        if s is None:
            return None
        if self.kind == "kl":
            return gaussian_kl(mean, var, s["mean"], s["var"])
        floor_m = 0.05 * s["var"].sqrt() + 1e-3
        zm = (mean - s["slide_mean"]) / (s["slide_mean_sd"] + floor_m)
        zl = (torch.log(var + 1e-5) - s["slide_logvar"]) / (s["slide_logvar_sd"] + _FLOOR_LOGSD)
        excess = torch.relu(zm.abs() - self.tolerance) ** 2 + torch.relu(zl.abs() - self.tolerance) ** 2
        return 0.5 * excess.mean()

    def __call__(self, net: NucleiNet, x: torch.Tensor) -> tuple[torch.Tensor, float, dict[str, torch.Tensor]]:
        """(alignment loss over the chosen layers, shift score over the encoder layers, network outputs)."""
        with capture_bn_inputs(net) as st:
            out = net(x)
        total, shift = x.new_zeros(()), 0.0
        for name, (mu, var) in st.items():
            term = self.layer(name, mu, var)
            if term is None:
                continue
            encoder = name.startswith(ENCODER_PREFIXES)
            if self.layers == "all" or encoder:
                total = total + term
            if encoder:
                shift += float(term.detach())
        return total, shift, out


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
    if not kept and settings.guard:
        before = guard.census(copy.deepcopy(net).float().eval(), card, images)
        after = guard.census(work, card, images)
        reason = guard.implausible(before, after, settings.count_bounds, settings.area_bounds)
        c, a = guard.ratios(before, after)
        rep["census"] = {"count_before": before.count, "count_after": after.count, "count_ratio": round(c, 4),
                         "median_area_before": before.median_area, "median_area_after": after.median_area,
                         "area_ratio": round(a, 4)}
        if reason:
            kept = True
            rep["guard"] = reason
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
    opt = torch.optim.Adam(params, lr=s.tent_lr)
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


def _param_groups(net: nn.Module, which: str) -> dict[str, list[nn.Parameter]]:
    """Layers as parameter groups: BN affine pairs, or every conv and BN module's parameters."""
    if which in ("bn", "bnstats"):
        return _affine_params(net)
    out: dict[str, list[nn.Parameter]] = {}
    for name, m in net.named_modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
            ps = [p for p in m.parameters(recurse=False)]
            if ps:
                out[name] = ps
    return out


def _norm(ts: Sequence[torch.Tensor | None]) -> float:
    return math.sqrt(sum(float((t.detach() ** 2).sum()) for t in ts if t is not None))


def _top_groups(
    groups: dict[str, list[nn.Parameter]], r: dict[str, float], fraction: float
) -> dict[str, list[nn.Parameter]]:
    """The layers with the highest gradient-to-parameter ratios (at least one); the others are frozen."""
    n = max(1, math.ceil(fraction * len(groups)))
    keep = set(sorted(groups, key=lambda k: (-r[k], k))[:n])
    for name, ps in groups.items():
        if name not in keep:
            for p in ps:
                p.requires_grad_(False)
                p.grad = None
    return {k: v for k, v in groups.items() if k in keep}


def _g2p(net: NucleiNet, x: torch.Tensor, card: ModelCard, s: TTASettings) -> dict[str, Any]:
    """Steps along the alignment gradient, each layer moved by ``lr x r_l / mean(r)`` of its own norm.

    The iterate with the lowest alignment loss is kept (the loss is evaluated at every iterate anyway); a
    slide already within the tolerance costs one forward pass and keeps the source weights.
    """
    loss_fn = AlignmentLoss(card.source_stats, s.loss, s.tolerance, s.layers)
    groups = _param_groups(net, s.params)
    for p in net.parameters():
        p.requires_grad_(False)
    for ps in groups.values():
        for p in ps:
            p.requires_grad_(True)
    params = [p for ps in groups.values() for p in ps]
    best: tuple[float, int, list[torch.Tensor] | None] = (math.inf, 0, None)
    before = shift0 = math.nan
    heads0: dict[str, float] = {}
    heads_best: dict[str, float] = {}
    gated = False
    ratios: dict[str, float] = {}
    history: list[float | None] = []
    for it in range(s.steps + 1):
        last = it == s.steps
        with torch.set_grad_enabled(not last):
            loss, shift, out = loss_fn(net, x)
        value = float(loss.detach())
        history.append(round(value, 6) if math.isfinite(value) else None)
        if not math.isfinite(value):
            break  # diverged: the best iterate so far (or the source) is kept
        if it == 0:
            before, heads0, shift0 = value, guard.heads(out), shift
            if shift <= s.gate or value <= 1e-9:
                gated = True
                break  # no shift detected: the slide is within the source slides' range
        if value < best[0]:
            best = (value, it, None if it == 0 else [p.detach().clone() for p in params])
            heads_best = guard.heads(out)
        if last:
            break
        if it == 0 and s.params == "bnstats":
            _adabn(net, x)  # the first move: statistics re-estimated; later steps move the affine parameters
            continue
        for p in params:
            p.grad = None
        loss.backward()
        norms = {name: (_norm([p.grad for p in ps]) + 1e-12, _norm(ps)) for name, ps in groups.items()}
        r = {name: g / (t + 1e-12) for name, (g, t) in norms.items()}
        if not ratios:
            ratios = r  # at the source weights (after the statistics for "bnstats")
            if s.params == "top":
                groups = _top_groups(groups, r, s.top)
        mean_r = sum(r.values()) / max(1, len(r)) + 1e-12
        with torch.no_grad():
            for name, ps in groups.items():
                scale = (r[name] / mean_r) if s.guided else 1.0
                gnorm, tnorm = norms[name]
                # move the layer by (lr x scale) of its own norm, along the negative gradient
                step = s.lr * scale * tnorm / gnorm
                for p in ps:
                    if p.grad is not None:
                        p.sub_(step * p.grad)
    after, best_it, best_params = best
    kept, reason = False, ""
    if best_params is None:
        kept = True
        reason = "no shift detected (loss within the gate)" if gated else "alignment loss did not fall"
    else:
        reason = guard.collapsed(heads0, heads_best)
        kept = bool(reason)
    with torch.no_grad():
        if best_params is not None and not kept:
            for p, v in zip(params, best_params, strict=True):
                p.copy_(v)
    for p in net.parameters():
        p.requires_grad_(False)
    ranked = sorted(ratios.items(), key=lambda kv: -kv[1])
    return {
        "loss": loss_fn.kind,
        "tolerance": s.tolerance if s.loss == "z" else None,
        "params": s.params,
        "shift_score": shift0,
        "gate": s.gate,
        "loss_before": before,
        "loss_after": after if not kept else before,
        "loss_history": history,
        "best_step": best_it,
        "heads_before": heads0,
        "heads_after": heads_best if not kept else heads0,
        "guided": s.guided,
        "g2p_ratios": {k: round(v, 6) for k, v in ranked},
        "moved_layers": sorted(groups),
        "kept_source": kept,
        "guard": reason,
    }
