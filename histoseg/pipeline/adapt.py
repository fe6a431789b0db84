"""Adapt the model to one slide, once, before its regions are scheduled (design.md section 6).

Crops are sampled from the slide's tissue mask on a fixed grid of crop-sized cells in plane coordinates
(never from the region plan), so the adaptation's input, and with it every nucleus, depends only on the
slide, its tissue and the adaptation settings: not on the region size, the worker count or the cluster.
The adapted weights are written as a safetensors artifact beside the slide's outputs, and workers load
that artifact like any model.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoseg.config import SegmentConfig
from histoseg.distributed.runner import release_freed_memory
from histoseg.errors import ConfigError
from histoseg.inference import DensePredictor, NetworkPredictor
from histoseg.io import open_slide
from histoseg.models import ModelArtifact, load_model, save_model
from histoseg.models.arch import STRIDE
from histoseg.pipeline.plan import SlidePlan
from histoseg.tiling.regions import _tissue_fraction
from histoseg.tta import TTASettings, adapt, has_slide_statistics
from histoseg.types import Box

log = logging.getLogger(__name__)

# candidate cells by tissue cover, most preferred first: interior tissue before tissue edges (fibres, debris)
_COVER_LEVELS = (0.9, 0.5, 0.0)


def crop_boxes(tissue: np.ndarray, plane_shape: tuple[int, int], settings: TTASettings) -> list[Box]:
    """K crop boxes (plane px) on the fixed grid of ``crop``-sized cells anchored at the plane's origin.

    Candidates are the whole cells inside the plane whose tissue cover (from the thumbnail mask, measured as
    the region plan measures it) reaches the highest of ``_COVER_LEVELS`` that yields at least K cells; they
    are taken in raster order, split into K consecutive groups (bands of the tissue) and one cell is drawn
    from each group with ``settings.seed``. A plane smaller than one crop gives one crop at the origin,
    clipped to the plane (a multiple of the stride). Nothing here depends on the region plan.
    """
    crop = max(STRIDE, settings.crop // STRIDE * STRIDE)
    h, w = plane_shape
    if h < crop or w < crop:
        return [Box(0, 0, min(w, crop) // STRIDE * STRIDE, min(h, crop) // STRIDE * STRIDE)] if tissue.any() else []
    rows, cols = h // crop, w // crop  # whole cells only
    cover = _tissue_fraction(tissue, (rows, cols), plane_shape, crop).ravel()  # raster order
    picks: list[int] = []
    for level in _COVER_LEVELS:
        picks = [i for i, f in enumerate(cover) if f > 0 and f >= level]
        if len(picks) >= settings.regions:
            break
    if not picks:
        return []
    rng = np.random.default_rng(settings.seed)
    groups = np.array_split(np.array(picks), min(settings.regions, len(picks)))
    cells = [int(g[int(rng.integers(0, len(g)))]) for g in groups]
    return [Box(i % cols * crop, i // cols * crop, crop, crop) for i in cells]


def sample_crops(
    slide_path: str | Path,
    tissue: np.ndarray,
    plane_shape: tuple[int, int],
    mpp: float,
    settings: TTASettings,
    backend: str = "auto",
    slide_mpp: float | None = None,
) -> list[np.ndarray]:
    """The K adaptation crops (RGB at ``mpp``) of ``crop_boxes``, in their fixed order."""
    boxes = crop_boxes(tissue, plane_shape, settings)
    if not boxes:
        return []
    with open_slide(slide_path, backend=backend, mpp=slide_mpp) as reader:
        return [reader.read_plane(b, mpp) for b in boxes]


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


def adapt_stage_text(plan: SlidePlan, predictor: DensePredictor, config: SegmentConfig) -> str:
    """What the adaptation stage will do, for a progress display (``auto`` resolved as ``_adapt`` does)."""
    method = tta_method(plan, predictor, config)
    if method == "none":
        return "planning regions"
    return f"adapting to the slide ({method}, {config.tta_regions} crops, up to {config.tta_steps} steps)"


def tta_method(plan: SlidePlan, predictor: DensePredictor, config: SegmentConfig) -> str:
    """``--tta`` with ``auto`` resolved: g2p for a network model whose card has per-slide statistics."""
    if config.tta != "auto":
        return config.tta
    network = isinstance(predictor, NetworkPredictor)
    return "g2p" if network and has_slide_statistics(plan.card.source_stats) else "none"


def adapt_slide(
    plan: SlidePlan, predictor: DensePredictor, config: SegmentConfig, target: Path
) -> tuple[DensePredictor, dict[str, Any]]:
    """Adapt the network to this slide once, before its regions run (``--tta``); workers then load the
    adapted artifact like any model. ``segment`` and ``histoseg adapt`` both call this. Runs single-threaded
    so the weights do not depend on the machine's thread count (outputs must not depend on the workers)."""
    method = tta_method(plan, predictor, config)
    if method == "none":
        return predictor, {"method": "none", "requested": config.tta}
    if not isinstance(predictor, NetworkPredictor):
        raise ConfigError("--tta needs a network model (a registered name or a .safetensors path)")
    artifact = predictor.artifact
    settings = TTASettings(method=method, regions=config.tta_regions, steps=config.tta_steps)
    t0 = time.perf_counter()
    crops = sample_crops(
        plan.path, plan.tissue, plan.plane_shape, plan.card.mpp, settings, config.backend, config.slide_mpp
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        adapted, report = adapt_to_slide(artifact, crops, settings, target)
    finally:
        torch.set_num_threads(threads)
        del crops
        gc.collect()
        release_freed_memory()  # the crops' activations and gradients: not needed while the regions run
    report["seconds_total"] = time.perf_counter() - t0
    report["settings"] = asdict(settings)
    report["requested"] = config.tta
    report["source_weights_sha256"] = artifact.sha256()
    log.info(
        "%s: adapted with %s in %.1f s (loss %s -> %s%s)",
        plan.path.name, method, report["seconds_total"], report.get("loss_before"), report.get("loss_after"),
        ", source kept: " + report.get("guard", "") if report.get("kept_source") else "",
    )
    return predictor.with_artifact(adapted), report
