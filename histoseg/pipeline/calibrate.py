"""Calibrate an int8 engine on the slide itself, once, before its regions are scheduled.

``--runtime openvino-int8|onnxruntime-int8`` quantise the network after training: each activation's int8 range
is measured on calibration crops. Here those crops are the slide's own tissue, sampled like the adaptation's
(:func:`histoseg.pipeline.adapt.sample_crops`: a fixed grid of crop-sized cells in plane coordinates, seeded), so

* no dataset is needed on the user's machine (MoNuSeg training crops were the only source before);
* the ranges fit the slide's staining, and the adapted weights when the slide was adapted;
* the crops, and with them every nucleus, depend only on the slide and the settings: not on the region size,
  the workers or the cluster.

Measured with the default model (AMD EPYC, AVX2 only, 7-bit weights: ``inference.quantize.SLIDE_SETTINGS``),
each test image calibrated on this sampler's crops of itself: MoNuSeg-test PQ 0.5762 (OpenVINO int8) and 0.5774
(ONNX Runtime int8) against 0.5764 in fp32 (0.5761 / 0.5777 with MoNuSeg training crops); DSB 2018 H&E (30
images, another lab) 0.3224 against 0.3242 (OpenVINO).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from histoseg.config import SegmentConfig
from histoseg.errors import ConfigError
from histoseg.inference import DensePredictor, NetworkPredictor
from histoseg.inference.quantize import calibration_tag, write_calibration
from histoseg.inference.runtime import INT8_SUFFIX
from histoseg.pipeline.adapt import crop_boxes, sample_crops
from histoseg.pipeline.plan import SlidePlan
from histoseg.tta import TTASettings

SAMPLER = TTASettings(method="none", regions=16, crop=256, seed=0)
"""The calibration crops: 16 tissue cells of 256 px (the size and count measured for MoNuSeg calibration)."""


def runs_int8(predictor: DensePredictor) -> TypeGuard[NetworkPredictor]:
    """Whether ``predictor`` runs an int8 engine (the only ones calibrated)."""
    return isinstance(predictor, NetworkPredictor) and predictor.runtime.endswith(INT8_SUFFIX)


def calibrated(
    predictor: NetworkPredictor, crops: list[np.ndarray], target: Path
) -> tuple[NetworkPredictor, dict[str, Any]]:
    """``predictor`` calibrated on ``crops`` (RGB at the card's mpp, written to ``target``) and what provenance
    records of them."""
    if not crops:
        raise ConfigError(f"no tissue crop to calibrate the int8 engine on ({target.name})")
    write_calibration(crops, target)
    record = {
        "source": "slide",
        "crops": len(crops),
        "crop_px": SAMPLER.crop,
        "seed": SAMPLER.seed,
        "crops_digest": calibration_tag(target),  # of what was stored
    }
    return replace(predictor, calibration=str(target)), record


def calibrate_slide(
    plan: SlidePlan, predictor: DensePredictor, config: SegmentConfig, target: Path
) -> tuple[DensePredictor, dict[str, Any] | None]:
    """The predictor calibrated on this slide's tissue (crops written to ``target``) and what provenance records,
    or the predictor unchanged and None when it runs no int8 engine (nothing is read then)."""
    if not runs_int8(predictor):
        return predictor, None
    crops = sample_crops(
        plan.path, plan.tissue, plan.plane_shape, plan.card.mpp, SAMPLER, config.backend, config.slide_mpp
    )
    return calibrated(predictor, crops, target)


def calibrate_image(predictor: DensePredictor, image: np.ndarray, target: Path) -> DensePredictor:
    """``predictor`` calibrated on an in-memory image (RGB at the card's mpp, all of it tissue) as
    :func:`calibrate_slide` calibrates on a slide: the same sampler and crops (benchmarks, notebooks). Other
    engines are returned unchanged."""
    if not runs_int8(predictor):
        return predictor
    tissue = np.ones((image.shape[0] // 8 + 1, image.shape[1] // 8 + 1), bool)
    crops = [image[b.y : b.y + b.h, b.x : b.x + b.w] for b in crop_boxes(tissue, image.shape[:2], SAMPLER)]
    return calibrated(predictor, crops, target)[0]
