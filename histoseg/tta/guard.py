"""Unsupervised plausibility check of an adapted network against the source network on the slide's crops.

Adaptation has no labels to tell whether it helped; what it can see is what each network *finds* on the
slide's own crops. A stain or scanner shift changes how nuclei look, not how many there are or how large
they are, so an adaptation that changes the nucleus count or the median nucleus area by more than the
bounds is taken to have moved the model somewhere implausible (issue 11: accepted adaptations that
doubled the count on fibres and debris), and the source weights are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from histoseg.inference import run_network
from histoseg.models import ModelCard, NucleiNet
from histoseg.postprocess import WatershedParams, separate_instances


@dataclass(frozen=True)
class Census:
    """What a network finds on a set of crops: nuclei counted and their median area (px at the card's mpp)."""

    count: int
    median_area: float


def census(net: NucleiNet, card: ModelCard, crops: Sequence[np.ndarray]) -> Census:
    """Segment every crop with the card's post-processing and pool the nuclei found."""
    params = WatershedParams(**card.postprocess) if card.postprocess else WatershedParams()
    areas: list[np.ndarray] = []
    for crop in crops:
        np_prob, hv, _ = run_network(net, card, crop)
        inst = separate_instances(np_prob, hv, card.mpp, params)
        sizes = np.bincount(inst.ravel())[1:]
        areas.append(sizes[sizes > 0])
    pooled = np.concatenate(areas) if areas else np.zeros(0)
    return Census(int(pooled.size), float(np.median(pooled)) if pooled.size else 0.0)


def ratios(before: Census, after: Census) -> tuple[float, float]:
    """(count ratio, median-area ratio) after / before; +1 smoothing so that 0 -> 0 reads as unchanged."""
    return (after.count + 1) / (before.count + 1), (after.median_area + 1) / (before.median_area + 1)


def implausible(
    before: Census, after: Census, count_bounds: tuple[float, float], area_bounds: tuple[float, float]
) -> str:
    """Why the adapted network's census is implausible against the source's, or "" when it is within bounds."""
    c, a = ratios(before, after)
    if not count_bounds[0] <= c <= count_bounds[1]:
        return f"nucleus count changed implausibly ({before.count} -> {after.count} on the crops, x{c:.2f})"
    if not area_bounds[0] <= a <= area_bounds[1]:
        return (f"median nucleus area changed implausibly ({before.median_area:.0f} -> {after.median_area:.0f} px, "
                f"x{a:.2f})")
    return ""


def heads(out: dict[str, torch.Tensor]) -> dict[str, float]:
    """Summaries of the three heads: HV spread, NP nucleus fraction, TP class-mix entropy over nuclei (if present)."""
    with torch.no_grad():
        h = {
            "hv_spread": float(out["hv"].float().std()),
            "np_fraction": float(torch.softmax(out["np"].float(), 1)[:, 1].mean()),
        }
        if "tp" in out:
            q, w = type_distribution(out)
            mix = (q * w.unsqueeze(1)).sum(dim=(0, 2, 3)) / w.sum().clamp_min(1e-8)
            h["tp_entropy"] = float(-(mix * torch.log(mix.clamp_min(1e-8))).sum())
    return h


def type_distribution(out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel type distribution and where it matters: the type head's independent sigmoids normalised
    over the types (B, C, H, W), and the NP head's nucleus probability (B, H, W) as each pixel's weight (the
    type head says nothing about background pixels, where every type is absent)."""
    p = torch.sigmoid(out["tp"].float())
    q = p / p.sum(1, keepdim=True).clamp_min(1e-8)
    return q, torch.softmax(out["np"].float(), 1)[:, 1]


def collapsed(h0: dict[str, float], h1: dict[str, float]) -> str:
    """Why the adapted heads are not trusted, or "" (a guard on all three heads, not only the loss)."""
    if h1["hv_spread"] < 0.5 * h0["hv_spread"]:
        return f"HV head collapsed (spread {h0['hv_spread']:.3f} -> {h1['hv_spread']:.3f})"
    lo, hi = sorted((h0["np_fraction"], h1["np_fraction"]))
    if lo < 0.25 * hi or h1["np_fraction"] < 1e-3:
        return f"NP head collapsed (nucleus fraction {h0['np_fraction']:.3f} -> {h1['np_fraction']:.3f})"
    if "tp_entropy" in h0 and h1["tp_entropy"] < 0.5 * h0["tp_entropy"]:
        return f"TP head collapsed (class-mix entropy {h0['tp_entropy']:.3f} -> {h1['tp_entropy']:.3f})"
    return ""
