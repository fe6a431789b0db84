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
  gradient-to-parameter ratio ``r_l = ||g_l|| / ||theta_l||`` at the source weights, or BN affine only) each
  move by ``lr x r_l / mean(r)`` of their own norm along the
  negative gradient (``guided=False``: every layer by ``lr``). The iterate with the lowest loss is kept; a
  guard keeps the source weights when no iterate beats it or when a head collapses (``guard.collapsed``).

Every method's result then passes the plausibility check (``guard``, ``TTASettings.guard``): the adapted and
the source model segment the same crops, and an adaptation that changes the nucleus count or median area
beyond ``count_bounds`` / ``area_bounds``, adds nuclei paler than the slide's nuclei (``min_added_contrast``)
or removes ones as dark as them (``max_removed_contrast``), or whose nucleus maps do not become more consistent
under mirroring (``min_view_gain``, ``guard.view_agreement``) is rejected (the source weights are kept; the
census and agreement are reported).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from histoseg.errors import ModelError
from histoseg.models import ModelCard, NucleiNet
from histoseg.models.inputs import to_input
from histoseg.tta import guard
from histoseg.tta.bnops import adabn, affine_params
from histoseg.tta.g2p import g2p, has_slide_statistics
from histoseg.tta.settings import METHODS, PARAMS, AdaptResult, TTASettings

__all__ = ["METHODS", "PARAMS", "AdaptResult", "TTASettings", "adapt", "has_slide_statistics"]


def adapt(net: NucleiNet, card: ModelCard, images: Sequence[np.ndarray], settings: TTASettings) -> AdaptResult:
    """Adapt a copy of ``net`` to ``images`` (crops of one slide); ``net`` itself is not modified."""
    t0 = time.perf_counter()
    base = {"method": settings.method, "regions": len(images), "steps": settings.steps, "crop": settings.crop}
    if settings.method == "none" or not images:
        return AdaptResult(None, {**base, "kept_source": True, "seconds": 0.0})
    torch.manual_seed(settings.seed)
    work = copy.deepcopy(net).float().eval()
    x = to_input(list(images), card)
    if settings.method == "bn":
        adabn(work, x)
        rep: dict[str, Any] = {}
    elif settings.method == "tent":
        adabn(work, x)
        rep = _tent(work, x, settings)
    else:
        if not card.source_stats:
            raise ModelError(f"model {card.name!r} has no source feature statistics in its card: g2p needs them")
        rep = g2p(work, x, card, settings)
    kept = bool(rep.get("kept_source", False))
    if not kept and settings.guard:
        source = copy.deepcopy(net).float().eval()
        before_maps = guard.segment_crops(source, card, images)
        after_maps = guard.segment_crops(work, card, images)
        before, after = guard.census_of(before_maps), guard.census_of(after_maps)
        changed = guard.changed_nuclei(before_maps, after_maps, images)
        reason = guard.implausible(before, after, settings.count_bounds, settings.area_bounds) or guard.unlike_nuclei(
            changed, settings.min_added_contrast, settings.max_removed_contrast)
        c, a = guard.ratios(before, after)
        rep["census"] = {"count_before": before.count, "count_after": after.count, "count_ratio": round(c, 4),
                         "median_area_before": before.median_area, "median_area_after": after.median_area,
                         "area_ratio": round(a, 4), "added": int(changed["added"]),
                         "removed": int(changed["removed"]), "added_contrast": _finite(changed["z_added"]),
                         "removed_contrast": _finite(changed["z_removed"])}
        if not reason and settings.min_view_gain is not None:  # only where the census passed: 8 passes per crop
            va0, va1 = guard.view_agreement(source, card, images), guard.view_agreement(work, card, images)
            rep["census"].update(view_agreement_before=round(va0, 4), view_agreement_after=round(va1, 4))
            reason = guard.less_consistent(va0, va1, settings.min_view_gain)
        if reason:
            kept = True
            rep["guard"] = reason
    state = None if kept else {k: v.detach().clone() for k, v in work.state_dict().items()}
    return AdaptResult(state, {**base, **rep, "kept_source": kept, "seconds": time.perf_counter() - t0})


def _finite(v: float) -> float | None:
    """A JSON-safe number: None for nan (provenance is strict JSON)."""
    return round(float(v), 4) if np.isfinite(v) else None


def _entropy(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tent's objective: NP entropy, plus the entropy of the type distribution weighted by nucleus probability."""
    ent = _mean_entropy(out["np"])
    if "tp" in out:
        q, w = guard.type_distribution(out)
        w = w.detach()  # where nuclei are is NP's entropy term's business, not the type term's
        per_pixel = -(q * torch.log(q.clamp_min(1e-8))).sum(1)
        ent = ent + (per_pixel * w).sum() / w.sum().clamp_min(1e-8)
    return ent


def _mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits.float(), dim=1)
    return -(p * torch.log(p.clamp_min(1e-8))).sum(1).mean()


def _tent(net: NucleiNet, x: torch.Tensor, s: TTASettings) -> dict[str, Any]:
    params = [p for ps in affine_params(net).values() for p in ps]
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
