"""Unsupervised plausibility check of an adapted network against the source network on the slide's crops.

Adaptation has no labels to tell whether it helped; what it can see is what each network *finds* on the
slide's own crops. Three checks, all against the source network on the same crops:

- the census: an adaptation that changes the nucleus count or the median nucleus area beyond the bounds
  has moved the model somewhere implausible;
- the stain contrast of what changed (:func:`changed_nuclei`): nuclei the adaptation *adds* must be about
  as dark in hematoxylin as the nuclei both networks agree on, relative to the slide's own tissue. A
  source model that misses pale or small nuclei on a shifted slide legitimately finds more after adapting
  (DSB: more nuclei, and better); one that starts calling fibres and debris nuclei (issue 11's failures:
  x1.3 and x2.1 counts) adds pale objects;
- self-consistency under mirroring (:func:`view_agreement`): the adapted network's nucleus maps of a crop
  and of its mirror images must agree better than the source's do; an adaptation that drifts in other ways
  (nuclei split, merged, grown) loses the consistency that training under mirror augmentation gave.

The bounds and thresholds are chosen on the development benchmark (``benchmarks/tta_dev.py``,
``benchmarks/tta_guard_sweep.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from histoseg.inference import run_network
from histoseg.inference.views import view_maps
from histoseg.models import ModelCard, NucleiNet
from histoseg.postprocess import WatershedParams, hematoxylin, separate_instances


@dataclass(frozen=True)
class Census:
    """What a network finds on a set of crops: nuclei counted and their median area (px at the card's mpp)."""

    count: int
    median_area: float


def segment_crops(net: NucleiNet, card: ModelCard, crops: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Instance label images of the crops, with the card's post-processing."""
    params = WatershedParams(**card.postprocess) if card.postprocess else WatershedParams()
    out = []
    for crop in crops:
        np_prob, hv, _ = run_network(net, card, crop)
        out.append(separate_instances(np_prob, hv, card.mpp, params))
    return out


def census_of(labels: Sequence[np.ndarray]) -> Census:
    """Nuclei counted and their median area, pooled over label images."""
    areas = [sizes[sizes > 0] for sizes in (np.bincount(inst.ravel())[1:] for inst in labels)]
    pooled = np.concatenate(areas) if areas else np.zeros(0)
    return Census(int(pooled.size), float(np.median(pooled)) if pooled.size else 0.0)


def census(net: NucleiNet, card: ModelCard, crops: Sequence[np.ndarray]) -> Census:
    """Segment every crop with the card's post-processing and pool the nuclei found."""
    return census_of(segment_crops(net, card, crops))


_WHITE_OD = 0.15  # summed RGB optical density below which a pixel is glass, not tissue


def changed_nuclei(
    before: Sequence[np.ndarray], after: Sequence[np.ndarray], crops: Sequence[np.ndarray], overlap: float = 0.2
) -> dict[str, float]:
    """Where the adapted network finds nuclei the source did not (and the reverse), how nucleus-like they are.

    A nucleus of ``after`` is *added* when less than ``overlap`` of its pixels lie in any ``before`` nucleus
    (*removed*: the same the other way). Its stain contrast is ``z = (H - H_tissue) / (H_kept - H_tissue)``
    with H the mean hematoxylin optical density over its pixels, ``H_kept`` that over the pixels both networks
    call nucleus and ``H_tissue`` that over tissue (non-glass) pixels neither does: near 1 for nuclei as dark
    as the ones both agree on, near 0 for stroma, fibres and debris. Relative to the slide's own nuclei and
    tissue, so it holds under stain shifts. Returns counts and the pooled z of added and removed nuclei
    (nan when there are none, or when the crops show no tissue between nuclei to compare with)."""
    sums = {"added": [0.0, 0], "removed": [0.0, 0], "kept": [0.0, 0], "tissue": [0.0, 0]}
    n = {"added": 0, "removed": 0}
    for b, a, crop in zip(before, after, crops, strict=True):
        h = hematoxylin(crop[..., :3]).astype(np.float64)
        od = -np.log(np.maximum(crop[..., :3].astype(np.float64), 1.0) / 255.0).sum(axis=2)
        both = (a > 0) & (b > 0)
        tissue = (a == 0) & (b == 0) & (od > _WHITE_OD)
        for key, m in (("kept", both), ("tissue", tissue)):
            sums[key][0] += float(h[m].sum())
            sums[key][1] += int(m.sum())
        for key, lab, other in (("added", a, b > 0), ("removed", b, a > 0)):
            size = np.bincount(lab.ravel())
            inside = np.bincount(lab.ravel(), weights=other.ravel().astype(np.float64), minlength=size.size)
            hsum = np.bincount(lab.ravel(), weights=h.ravel(), minlength=size.size)
            ids = np.flatnonzero((size > 0) & (inside < overlap * size))
            ids = ids[ids > 0]
            n[key] += int(ids.size)
            sums[key][0] += float(hsum[ids].sum())
            sums[key][1] += int(size[ids].sum())

    def mean(key: str) -> float:
        total, count = sums[key]
        return total / count if count else float("nan")

    h_kept, h_tissue = mean("kept"), mean("tissue")
    span = h_kept - h_tissue
    out: dict[str, float] = {"added": n["added"], "removed": n["removed"]}
    for key in ("added", "removed"):
        ok = n[key] and np.isfinite(span) and span > 1e-6
        out[f"z_{key}"] = (mean(key) - h_tissue) / span if ok else float("nan")
    return out


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


def unlike_nuclei(changed: dict[str, float], min_added: float | None, max_removed: float | None) -> str:
    """Why the nuclei an adaptation added (or removed) are not plausible, or "" (see :func:`changed_nuclei`).

    Added nuclei much paler in hematoxylin than the nuclei both networks find are stroma, fibres or debris
    (issue 11's failures: the extra nuclei sat on fibres and debris at the tissue edge); removed nuclei as
    dark as the kept ones were real. Nothing added (removed) passes; a missing contrast (no tissue between
    nuclei to compare with) fails."""
    za, zr = changed.get("z_added", float("nan")), changed.get("z_removed", float("nan"))
    if min_added is not None and changed.get("added", 0) and not za >= min_added:  # also catches nan
        return (f"the {int(changed.get('added', 0))} nuclei added have stain contrast {za:.2f} "
                f"(below {min_added}: paler than nuclei, like stroma or debris)")
    if max_removed is not None and changed.get("removed", 0) and not zr <= max_removed:
        return (f"the {int(changed.get('removed', 0))} nuclei removed have stain contrast {zr:.2f} "
                f"(above {max_removed}: as dark as the nuclei kept)")
    return ""


def mirror_agreement(prob: np.ndarray, mirrored: Sequence[np.ndarray], threshold: float = 0.5) -> list[float]:
    """IoU of the nucleus pixels (probability > ``threshold``) of a crop's map with each map of its mirror
    images, flipped back onto the crop (an empty union agrees: 1.0)."""
    b0 = prob > threshold
    out = []
    for p in mirrored:
        b = p > threshold
        union = int((b | b0).sum())
        out.append(float((b & b0).sum()) / union if union else 1.0)
    return out


def view_agreement(net: NucleiNet, card: ModelCard, crops: Sequence[np.ndarray]) -> float:
    """How far the network's nucleus map stays the same when the crops are mirrored: the mean
    :func:`mirror_agreement` over the crops and their three mirror images (1.0: the same map in every view).

    The network was trained under mirror augmentation, so on images like its training images its maps barely
    change with a mirror; on a shifted slide they disagree where it is unsure. An adaptation that helps makes
    the maps more consistent; one that drifts (nuclei split, merged or invented) does not (``TTASettings.
    min_view_gain``, chosen on the development benchmark)."""
    agree: list[float] = []
    for crop in crops:
        identity, *mirrored = view_maps(lambda im: run_network(net, card, im), crop, 4)
        agree.extend(mirror_agreement(identity[0], [maps[0] for maps in mirrored]))
    return float(np.mean(agree)) if agree else 1.0


def less_consistent(before: float, after: float, min_gain: float | None) -> str:
    """Why the adapted network's mirror-view agreement is not trusted, or "" (see :func:`view_agreement`)."""
    if min_gain is not None and not after >= before + min_gain:
        return (f"mirror-view agreement {before:.3f} -> {after:.3f} (the adapted model must agree with itself "
                f"under mirroring at least {min_gain} better than the source)")
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
