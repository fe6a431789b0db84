"""Adapt the model to one slide, once, before its regions are scheduled (design.md section 6).

Crops are sampled from the slide's tissue regions deterministically (evenly spread over the planned
regions in raster order, offsets from a seeded generator); the adapted weights are written as a
safetensors artifact beside the slide's outputs, and workers load that artifact like any model.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from histoseg.io import open_slide
from histoseg.models import ModelArtifact, load_model, save_model
from histoseg.models.network import STRIDE
from histoseg.tta import TTASettings, adapt
from histoseg.types import Box, Region


def sample_crops(
    slide_path: str | Path,
    regions: list[Region],
    mpp: float,
    settings: TTASettings,
    backend: str = "auto",
    slide_mpp: float | None = None,
    plane_shape: tuple[int, int] | None = None,
) -> list[np.ndarray]:
    """K crops of ``settings.crop`` px (multiple of the network stride) from K tissue regions."""
    crop = max(STRIDE, settings.crop // STRIDE * STRIDE)
    k = min(settings.regions, len(regions))
    if k == 0:
        return []
    picks = np.linspace(0, len(regions) - 1, k).round().astype(int)
    rng = np.random.default_rng(settings.seed)
    out = []
    with open_slide(slide_path, backend=backend, mpp=slide_mpp) as reader:
        for i in picks:
            core = regions[int(i)].core
            h, w = plane_shape if plane_shape else (core.y1, core.x1)
            span_y = max(1, min(core.h, h - core.y) - crop)
            span_x = max(1, min(core.w, w - core.x) - crop)
            y = core.y + int(rng.integers(0, span_y))
            x = core.x + int(rng.integers(0, span_x))
            out.append(reader.read_plane(Box(x, y, crop, crop), mpp))
    return out


def adapt_to_slide(
    artifact: ModelArtifact, crops: list[np.ndarray], settings: TTASettings, out_path: Path
) -> tuple[ModelArtifact, dict[str, Any]]:
    """Run the adaptation; write the adapted artifact (or return the source one if it was kept)."""
    net, card = load_model(artifact)
    res = adapt(net, card, crops, settings)
    report = dict(res.report)
    if res.state is None:
        report["weights_sha256"] = artifact.sha256()
        return artifact, report
    net.load_state_dict(res.state)
    card = replace(card, name=f"{card.name}+{settings.method}")
    card.training = {**card.training, "adapted_from": artifact.sha256(), "adaptation": settings.__dict__}
    new = save_model(net, card, out_path)
    report["weights_sha256"] = new.sha256()
    return new, report


def settings_key(settings: TTASettings) -> str:
    return hashlib.sha256(repr(sorted(settings.__dict__.items())).encode()).hexdigest()[:12]
