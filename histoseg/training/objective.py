"""The training objective of one batch whose crops come from datasets with different labels.

Per crop, by what its dataset declares: instance masks train NP (cross-entropy + Dice) and HV; binary
masks train NP only; points are propagated to dense labels (:mod:`histoseg.training.points`) that train
NP (soft targets weighted by the propagation's confidence; gradient also reaches the affinity branch)
and HV (from the pseudo-instances). The type head, when the model has one, gets the class-independent
BCE of :func:`histoseg.training.labels.type_targets` on every crop, with each dataset's class mask and, in
stage 2, its class-relational soft targets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from histoseg.datasets import Sample
from histoseg.training.augment import make_targets
from histoseg.training.data import TrainingSource
from histoseg.training.labels import type_targets
from histoseg.training.losses import hv_loss, np_loss, np_soft_loss, tp_bce
from histoseg.training.points import PointSupervision
from histoseg.training.targets import hv_maps

PointTarget = Literal["hard", "soft"]
POINT_TARGETS: tuple[PointTarget, ...] = ("hard", "soft")
"""NP target of a point-labelled crop. ``soft``: the walk's nucleus probability, one cross-entropy whose
gradient trains the network and the affinity at once (Vernaza & Chandraker's objective); the network then
learns soft masks that its 0.5 threshold shrinks (measured: Dice 0.39 on MoNuSeg test after 200 iterations
from points, against 0.73 for Voronoi labels). ``hard``: the pseudo-instances (the walk's most probable
label) train the network, and a second cross-entropy trains the affinity towards the network's prediction
(held fixed), an alternation of the same objective."""
POINT_HV_WEIGHT = 0.5
"""HV from propagated pseudo-instances is less certain than from drawn masks: half weight."""


@dataclass
class Stage:
    """What changes between the two stages: the relation rows per source index (stage 2) and their weight."""

    types: tuple[str, ...] = ()  # the unified types of the type head, in channel order
    point_target: PointTarget = "hard"  # NP target of point crops (see POINT_TARGETS)
    train_affinity: bool = True  # hard targets: whether the walk-consistency term trains the affinity yet
    relations: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    relation_weight: float = 0.0
    type_weight: float = 1.0


def batch_loss(
    out: Mapping[str, torch.Tensor],
    images: torch.Tensor,
    crops: Sequence[tuple[Sample, int]],
    sources: Sequence[TrainingSource],
    points: PointSupervision,
    stage: Stage,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss of a batch and its terms (for the log). ``images`` are the normalised inputs."""
    dev = images.device
    n, _, h, w = images.shape
    np_full = np.zeros((n, h, w), np.int64)
    hv_t = np.zeros((n, 2, h, w), np.float32)
    hv_focus = np.zeros((n, h, w), np.int64)
    has_np = np.zeros(n, bool)
    has_hv = np.zeros(n, bool)
    pt_idx: list[int] = []
    pt_soft: list[torch.Tensor] = []
    pt_weight: list[np.ndarray] = []
    inst_maps: list[np.ndarray] = []
    pix_w: list[np.ndarray] = []
    for i, (crop, k) in enumerate(crops):
        spec = sources[k].spec
        if spec.labels == "points":
            pts = crop.points if crop.points is not None else np.zeros((0, 2))
            t = points(images[i], crop.image, pts, spec.propagation, mpp=crop.mpp, exhaustive=spec.exhaustive)
            pt_idx.append(i)
            pt_soft.append(t.nucleus)
            pt_weight.append(t.weight)
            hv_t[i] = hv_maps(t.inst)
            hv_focus[i] = t.inst > 0
            has_hv[i] = True
            inst_maps.append(t.inst)
            pix_w.append(t.weight)
            continue
        _, np_map, hv, _ = make_targets(crop)
        np_full[i], has_np[i] = np_map, True
        if crop.inst is not None:
            hv_t[i], hv_focus[i], has_hv[i] = hv, np_map, True
            inst_maps.append(crop.inst.astype(np.int32))
        else:  # binary mask only: one "instance" of unknown type covers every nucleus pixel
            inst_maps.append(np_map.astype(np.int32))
        pix_w.append(np.ones((h, w), np.float32))
    terms: dict[str, torch.Tensor] = {}
    zero = out["np"].sum() * 0.0
    terms["np"] = (
        np_loss(out["np"], torch.from_numpy(np_full).to(dev), torch.from_numpy(has_np).to(dev))
        if has_np.any()
        else zero
    )
    if pt_idx:
        idx = torch.tensor(pt_idx, device=dev)
        soft = torch.stack(pt_soft)
        weight = torch.from_numpy(np.stack(pt_weight)).to(dev)
        if stage.point_target == "soft":  # Vernaza & Chandraker's single objective: one CE, both ways
            terms["np_points"] = np_soft_loss(out["np"][idx], soft, weight)
        else:
            hard = torch.from_numpy(np.stack([inst_maps[i] > 0 for i in pt_idx]).astype(np.float32)).to(dev)
            terms["np_points"] = np_soft_loss(out["np"][idx], hard, weight)
            if soft.requires_grad and stage.train_affinity:  # the walk learns to agree with the network
                net_p = torch.softmax(out["np"][idx].detach(), dim=1)[:, 1]
                terms["affinity"] = _walk_consistency(soft, net_p, weight)
    hv_valid = torch.from_numpy(has_hv & ~_point_mask(n, pt_idx)).to(dev)
    terms["hv"] = hv_loss(out["hv"], torch.from_numpy(hv_t).to(dev), torch.from_numpy(hv_focus).to(dev), hv_valid)
    if pt_idx:
        pv = torch.from_numpy(_point_mask(n, pt_idx)).to(dev)
        terms["hv_points"] = POINT_HV_WEIGHT * hv_loss(
            out["hv"], torch.from_numpy(hv_t).to(dev), torch.from_numpy(hv_focus).to(dev), pv
        )
    if "tp" in out:
        tgt, wt = [], []
        for i, (crop, k) in enumerate(crops):
            src = sources[k]
            types = src.instance_types(crop) if src.spec.labels == "points" else np.full(1, -1, np.int64)
            mask = src.spec.class_mask(stage.types)
            t, wgt = type_targets(inst_maps[i], types, pix_w[i], mask, stage.relations.get(k), stage.relation_weight)
            tgt.append(t)
            wt.append(wgt)
        nucleus = torch.from_numpy(np.stack([m > 0 for m in inst_maps])).to(dev)
        terms["tp"] = stage.type_weight * tp_bce(
            out["tp"], torch.from_numpy(np.stack(tgt)).to(dev), torch.from_numpy(np.stack(wt)).to(dev), nucleus
        )
    loss = sum(terms.values(), zero)
    return loss, {key: float(v.detach()) for key, v in terms.items()}


def _walk_consistency(walk: torch.Tensor, network: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the walk's nucleus probability against the network's (held fixed): trains the
    affinity branch so that propagation agrees with what the network learns over the whole dataset."""
    w = walk.clamp(1e-6, 1 - 1e-6)
    ce = -(network * torch.log(w) + (1.0 - network) * torch.log1p(-w))
    return (ce * weight).sum() / weight.sum().clamp_min(1.0)


def _point_mask(n: int, idx: Sequence[int]) -> np.ndarray:
    m = np.zeros(n, bool)
    m[list(idx)] = True
    return m
