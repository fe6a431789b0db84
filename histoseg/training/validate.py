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
    net: NucleiNet, card: ModelCard, image: np.ndarray, device: str = "cpu", bf16: bool = False
) -> np.ndarray:
    """Instance map of one image at the card's mpp."""
    np_prob, hv, _ = run_network(net, card, image, device=device, bf16=bf16)
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
