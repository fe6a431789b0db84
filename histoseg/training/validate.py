"""Whole-image prediction + post-processing + metrics, shared by training validation and evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from histoseg.inference import run_network
from histoseg.metrics import evaluate_instances, mean_over_images
from histoseg.models import ModelCard, NucleiNet
from histoseg.postprocess import WatershedParams, separate_instances

DETECTION_RADIUS_UM = 3.0


def predict_instances(
    net: NucleiNet, card: ModelCard, image: np.ndarray, device: str = "cpu", bf16: bool = False, views: int = 1
) -> np.ndarray:
    """Instance map of one image at the card's mpp (maps averaged over ``views`` views, ``inference.views``)."""
    np_prob, hv, _ = run_network(net, card, image, device=device, bf16=bf16, views=views)
    params = WatershedParams(**card.postprocess) if card.postprocess else WatershedParams()
    return separate_instances(np_prob, hv, card.mpp, params)


def validate(net: NucleiNet, card: ModelCard, samples: Sequence[Any], device: str = "cpu") -> dict[str, float]:
    """Mean Dice/AJI/PQ (and pooled detection F1) over samples that carry instance maps."""
    rows = []
    for s in samples:
        if s.inst is None:
            continue
        pred = predict_instances(net, card, s.image, device)
        rows.append(evaluate_instances(s.inst, pred, card.mpp, DETECTION_RADIUS_UM))
    return mean_over_images(rows) if rows else {}


POSTPROCESS_GRID: tuple[dict[str, float], ...] = tuple(
    {"np_threshold": np_t, "marker_threshold": mk}
    for np_t in (0.4, 0.5, 0.6)
    for mk in (0.1, 0.15, 0.2, 0.25, 0.3, 0.35)
)
"""The watershed thresholds :func:`tune_postprocess` tries by default."""


def tune_postprocess(
    net: NucleiNet,
    card: ModelCard,
    samples: Sequence[Any],
    device: str = "cpu",
    grid: Sequence[dict[str, float]] = POSTPROCESS_GRID,
) -> tuple[dict[str, float], dict[str, float]]:
    """Choose watershed thresholds on held-out *training* images (never the test set).

    The network's HV maps are smoother than ideal ones, so the marker threshold that is best on ideal
    maps merges touching nuclei on real predictions. Maps are predicted once per image; each setting of
    ``grid`` is scored by PQ + AJI (a one-setting grid just scores it). Returns the chosen parameters and
    their validation metrics.
    """
    maps = []
    for s in samples:
        if s.inst is None:
            continue
        np_prob, hv, _ = run_network(net, card, s.image, device=device)
        maps.append((s.inst, np_prob, hv))
    best: tuple[float, dict[str, float], dict[str, float]] | None = None
    for setting in grid:
        params = WatershedParams(**setting)
        rows = [
            evaluate_instances(inst, separate_instances(p, hv, card.mpp, params), card.mpp, DETECTION_RADIUS_UM)
            for inst, p, hv in maps
        ]
        m = mean_over_images(rows)
        score = m["pq"] + m["aji"]
        if best is None or score > best[0]:
            best = (score, dict(setting), m)
    if best is None:
        return {}, {}
    return best[1], best[2]
