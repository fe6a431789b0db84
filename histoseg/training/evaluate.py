"""``histoseg evaluate``: a model on MoNuSeg test, the DSB H&E subset or CRCHisto validation.

Images are resampled to the model's mpp for prediction; predicted instances are brought back to the
dataset's native grid (nearest neighbour) and scored there against the untouched ground truth, so figures
are comparable across processing resolutions. Detection radius: 3 µm for instance datasets (HoVer-Net's
12 px at 40x), 3.3 µm for CRCHisto (its 6 px at 20x convention).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from histoseg.datasets import Sample, load_crchisto, load_dsb, load_monuseg
from histoseg.errors import ConfigError
from histoseg.metrics import DetectionTally, centroids, evaluate_instances, match_points, mean_over_images
from histoseg.models import load_model, resolve_model
from histoseg.training.validate import predict_instances

RADIUS_UM = {"monuseg-test": 3.0, "dsb": 3.0, "crchisto-val": 3.3}


def load_dataset(name: str) -> list[Sample]:
    """Native-resolution samples of a named evaluation set."""
    if name == "monuseg-test":
        return load_monuseg("test", None)
    if name == "dsb":
        return load_dsb(None)
    if name == "crchisto-val":
        return load_crchisto("validation", None)
    raise ConfigError(f"unknown dataset {name!r}")


def predict_native(net: Any, card: Any, s: Sample, bf16: bool = False) -> np.ndarray:
    """Instance map on the sample's native grid, predicted at the model's mpp."""
    h, w = s.image.shape[:2]
    f = s.mpp / card.mpp  # model px per native px
    if abs(f - 1.0) > 1e-3:
        size = (max(16, int(round(w * f))), max(16, int(round(h * f))))
        interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
        img = cv2.resize(s.image, size, interpolation=interp)
    else:
        img = s.image
    pred = predict_instances(net, card, img, bf16=bf16)
    if pred.shape != (h, w):
        pred = cv2.resize(pred.astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST).astype(np.int32)
    return pred


def score_dataset(
    dataset: str, predict: Callable[[Sample], np.ndarray], limit: int | None = None
) -> dict[str, Any]:
    """Score any predictor (sample -> instance map on the sample's native grid) on a named dataset.

    Instance sets: per-image Dice/AJI/AJI+/DQ/SQ/PQ and detection counts, averaged (detection pooled);
    point sets (CRCHisto): pooled detection counts. Shared by ``evaluate`` and the benchmarks' baselines.
    """
    samples = load_dataset(dataset)[: limit or None]
    radius = RADIUS_UM[dataset]
    rows: list[dict[str, Any]] = []
    tally = DetectionTally()
    predict_seconds = 0.0
    t0 = time.perf_counter()
    for s in samples:
        t1 = time.perf_counter()
        pred = predict(s)
        predict_seconds += time.perf_counter() - t1
        if s.inst is not None:
            r = evaluate_instances(s.inst, pred, s.mpp, radius)
        else:
            if s.points is None:
                continue
            # centroids() returns pixel-centre (x, y) coordinates, the datasets' point convention
            m = match_points(s.points, centroids(pred), radius / s.mpp)
            tally.add_counts(m.tp, m.fp, m.fn)
            r = {"det_tp": float(m.tp), "det_fp": float(m.fp), "det_fn": float(m.fn)}
        rows.append({"image": s.name, **r})
    seconds = time.perf_counter() - t0
    if samples and samples[0].inst is not None:
        summary = mean_over_images(rows)
    else:
        summary = {
            "det_tp": float(tally.tp),
            "det_fp": float(tally.fp),
            "det_fn": float(tally.fn),
            "det_precision": tally.precision,
            "det_recall": tally.recall,
            "det_f1": tally.f1,
            "n_images": float(len(rows)),
        }
    return {
        "dataset": dataset,
        "radius_um": radius,
        "images": rows,
        "mean": summary,
        "seconds": seconds,
        "segment_seconds": predict_seconds,
    }


def evaluate(dataset: str, model: str = "default", limit: int | None = None, bf16: bool = False) -> dict[str, Any]:
    """Per-image rows and the mean (segmentation) / pooled (detection) summary of a model."""
    net, card = load_model(resolve_model(model))
    res = score_dataset(dataset, lambda s: predict_native(net, card, s, bf16), limit)
    return {**res, "model": card.name, "model_mpp": card.mpp}
