"""The two domains of ``histoseg adapt-cohort``: target crops from the cohort's slides, and the labelled source set.

Target crops are sampled from each slide's tissue with the per-slide adaptation's grid sampler
(:func:`histoseg.pipeline.adapt.sample_crops`, seeded), so a slide is read and refused exactly as ``segment``
reads and refuses it; the source is the MoNuSeg training set of ``histoseg train`` (``HISTOSEG_DATA``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histoseg.errors import ConfigError
from histoseg.models import ModelCard
from histoseg.training.config import TrainConfig
from histoseg.training.data import TrainingData


def cohort_crops(
    slides: Sequence[str | Path],
    *,
    model: str = "default",
    slide_mpp: float | None = None,
    crops_per_slide: int = 8,
    crop: int = 256,
    seed: int = 0,
    backend: str = "auto",
) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Seeded tissue crops (RGB at the model's mpp, ``crop`` px, reflect-padded when a slide is smaller) of
    every slide, and each slide's record (name, fingerprint, crops). Slides are planned as ``segment`` plans
    them, so unreadable, fluorescence or tissue-free slides raise the same typed errors."""
    from histoseg.config import SegmentConfig
    from histoseg.pipeline.adapt import sample_crops
    from histoseg.pipeline.identity import slide_fingerprint
    from histoseg.pipeline.plan import default_predictor, plan_slide
    from histoseg.tta import TTASettings

    if not slides:
        raise ConfigError("give at least one target slide or image")
    config = SegmentConfig(model=model, slide_mpp=slide_mpp, backend=backend, precision="fp32")  # type: ignore[arg-type]
    predictor = default_predictor(config)
    crops: list[np.ndarray] = []
    records: list[dict[str, Any]] = []
    for i, slide in enumerate(slides):
        plan = plan_slide(slide, config, predictor)
        sampler = TTASettings(method="none", regions=crops_per_slide, crop=crop, seed=seed + i)
        got = sample_crops(plan.path, plan.tissue, plan.plane_shape, plan.card.mpp, sampler, backend, slide_mpp)
        got = [_pad(c[..., :3], crop) for c in got]
        crops += got
        records.append({"name": plan.path.name, "fingerprint": slide_fingerprint(plan.path), "crops": len(got)})
    if not crops:
        raise ConfigError("no tissue crop could be sampled from the target slides")
    return crops, records


def _pad(img: np.ndarray, crop: int) -> np.ndarray:
    h, w = img.shape[:2]
    if h >= crop and w >= crop:
        return np.ascontiguousarray(img[:crop, :crop])
    mode = "reflect" if min(h, w) > 1 else "edge"
    out = np.pad(img, ((0, max(0, crop - h)), (0, max(0, crop - w)), (0, 0)), mode=mode)  # type: ignore[call-overload]
    return np.ascontiguousarray(out[:crop, :crop])


def source_data(card: ModelCard, crop: int, seed: int = 0) -> TrainingData:
    """The labelled source set of ``histoseg train``: MoNuSeg training images with instance masks (the
    model's held-out validation images stay out), at the model's mpp."""
    cfg_d = card.training.get("config", {}) if isinstance(card.training.get("config"), dict) else {}
    held = [str(v) for v in cfg_d.get("val_images", [])] if isinstance(cfg_d.get("val_images"), list) else []
    cfg = TrainConfig(mpp=card.mpp, crop=crop, seed=seed, semantic_fraction=0.0, val_images=held)
    return TrainingData.build(cfg)


def target_batch(crops: Sequence[np.ndarray], n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` target crops drawn with replacement, each randomly turned by a multiple of 90° and flipped."""
    out = []
    for j in rng.integers(0, len(crops), n):
        img = np.rot90(crops[int(j)], int(rng.integers(0, 4)))
        if rng.random() < 0.5:
            img = img[:, ::-1]
        out.append(np.ascontiguousarray(img))
    return out
