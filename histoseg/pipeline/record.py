"""The ``provenance.json`` record of one slide: versions, slide, model, arithmetic, engine, adaptation,
processing plan, settings, counts and timings (design.md section 7)."""

from __future__ import annotations

import platform
import sys
from typing import Any

import histoseg
from histoseg.config import SegmentConfig
from histoseg.inference import DensePredictor, NetworkPredictor
from histoseg.inference.precision import resolve_precision
from histoseg.inference.runtime import resolve_runtime
from histoseg.pipeline.plan import PlanOutcome, SlidePlan


def _precision_record(predictor: DensePredictor, config: SegmentConfig) -> dict[str, str]:
    """The arithmetic the network ran in and why (``--precision auto`` asks the device)."""
    choice = resolve_precision(config.precision, config.device)
    used = "bf16" if isinstance(predictor, NetworkPredictor) and predictor.bf16 else "fp32"
    if used != choice.precision:  # a caller-supplied predictor decided for itself
        return {"precision": used, "requested": config.precision, "reason": "set by the predictor"}
    return choice.to_dict()


def _runtime_record(predictor: DensePredictor, config: SegmentConfig) -> dict[str, str]:
    """The engine that ran the network and why (``--runtime auto`` takes the fastest installed)."""
    used = predictor.runtime if isinstance(predictor, NetworkPredictor) else "custom predictor"
    choice = resolve_runtime(config.runtime, config.device, config.precision)
    if used != choice.runtime:
        return {"runtime": used, "requested": config.runtime, "reason": "set by the predictor"}
    return choice.to_dict()


def provenance_record(
    plan: SlidePlan,
    fp: dict[str, Any],
    predictor: DensePredictor,
    config: SegmentConfig,
    outcome: PlanOutcome,
) -> dict[str, Any]:
    timings = outcome.timings
    art = predictor.artifact if isinstance(predictor, NetworkPredictor) else None
    meta, card, path = plan.meta, plan.card, plan.path
    return {
        "histoseg_version": histoseg.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "slide": {
            "path": str(path.resolve()),
            "fingerprint": fp,
            "backend": meta.backend,
            "vendor": meta.vendor,
            "dimensions": list(meta.dimensions),
            "levels": meta.level_count,
            "mpp": meta.mpp,
            "mpp_source": meta.mpp_source,
            "objective_power": meta.objective_power,
            "bounds_offset": list(meta.bounds_offset),
        },
        "model": {
            "name": card.name,
            "weights": str(art.weights) if art else None,
            "sha256": art.sha256() if art else None,
            "mpp": card.mpp,
        },
        "precision": _precision_record(predictor, config),
        "runtime": _runtime_record(predictor, config),
        "views": predictor.views if isinstance(predictor, NetworkPredictor) else 1,
        "adaptation": {"method": "none"},
        "processing": {
            "mpp": card.mpp,
            "scale_level0_per_plane_px": plan.scale,
            "plane_shape": list(plan.plane_shape),
            "region_size": config.region_size,
            "halo": plan.halo,
            "regions": len(plan.regions),
            "regions_reused": outcome.regions_reused,
            "regions_computed": outcome.regions_computed,
            "halo_edge_nuclei": outcome.edge_touching,
        },
        "config": config.to_dict(),
        "nuclei": outcome.nuclei,
        "timings_s": timings,
    }
