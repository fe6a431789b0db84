"""``histoseg evaluate``: a model on MoNuSeg test, the DSB H&E subset or CRCHisto validation.

Images are resampled to the model's mpp for prediction; predicted instances are brought back to the
dataset's native grid (nearest neighbour) and scored there against the untouched ground truth, so figures
are comparable across processing resolutions. Detection radius: 3 µm for instance datasets (HoVer-Net's
12 px at 40x), 3.3 µm for CRCHisto (its 6 px at 20x convention).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np

from histoseg.datasets import CRCHISTO_CLASSES, Sample, load_crchisto, load_dsb, load_monuseg
from histoseg.errors import ConfigError
from histoseg.inference import run_network
from histoseg.inference.views import Maps
from histoseg.metrics import (
    ClassificationTally,
    DetectionTally,
    centroids,
    evaluate_instances,
    match_points,
    mean_over_images,
)
from histoseg.metrics.classification import ClassificationResult
from histoseg.metrics.detection import PointMatch
from histoseg.models import load_model, resolve_model
from histoseg.postprocess import WatershedParams, decide_types, separate_instances
from histoseg.postprocess.pixelsums import LabelledPixels
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


def model_grid(s: Sample, card: Any) -> np.ndarray:
    """The sample's image resampled to the model's mpp (area averaging down, linear up; unchanged within 0.1 %)."""
    h, w = s.image.shape[:2]
    f = s.mpp / card.mpp  # model px per native px
    if abs(f - 1.0) <= 1e-3:
        return s.image
    size = (max(16, int(round(w * f))), max(16, int(round(h * f))))
    return cv2.resize(s.image, size, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)


def predict_native(net: Any, card: Any, s: Sample, bf16: bool = False, views: int = 1) -> np.ndarray:
    """Instance map on the sample's native grid, predicted at the model's mpp."""
    h, w = s.image.shape[:2]
    img = model_grid(s, card)
    pred = predict_instances(net, card, img, bf16=bf16, views=views)
    if pred.shape != (h, w):
        pred = cv2.resize(pred.astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST).astype(np.int32)
    return pred


def first(samples: Sequence[Any], limit: int | None) -> list[Any]:
    """The first ``limit`` samples (``None`` or 0: all, the benchmarks' ``--limit 0``); a negative limit is an
    error, not Python's "all but the last N"."""
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0 (0 or none: every image), got {limit}")
    return list(samples[: limit or None])


def score_dataset(dataset: str, predict: Callable[[Sample], np.ndarray], limit: int | None = None) -> dict[str, Any]:
    """Score any predictor (sample -> instance map on the sample's native grid) on a named dataset.

    Instance sets: per-image Dice/AJI/AJI+/DQ/SQ/PQ and detection counts, averaged (detection pooled);
    point sets (CRCHisto): pooled detection counts. Shared by ``evaluate`` and the benchmarks' baselines.
    """
    samples = first(load_dataset(dataset), limit)
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


def evaluate(
    dataset: str, model: str = "default", limit: int | None = None, bf16: bool = False, views: int = 1
) -> dict[str, Any]:
    """Per-image rows and the mean (segmentation) / pooled (detection) summary of a model; ``views``: the maps
    averaged over that many views (``inference.views``, ``--views``)."""
    net, card = load_model(resolve_model(model))
    res = score_dataset(dataset, lambda s: predict_native(net, card, s, bf16, views), limit)
    if dataset == "crchisto-val" and card.net.n_types:
        res["typing"] = score_typing(net, card, limit, bf16, views=views)
    return {**res, "model": card.name, "model_mpp": card.mpp, "views": views}


MapsFn = Callable[[np.ndarray], Maps]
"""RGB at the card's mpp -> (NP, HV, TP) maps: another engine in place of the PyTorch network (benchmarks)."""


def typed_nuclei_native(
    net: Any, card: Any, s: Sample, bf16: bool = False, views: int = 1, maps: MapsFn | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (x, y) on the sample's native grid and each nucleus's mean per-class probabilities (N, C)
    over its mask (``C = 0`` for an untyped model): the pipeline's per-nucleus sums
    (:mod:`histoseg.postprocess.pixelsums`), so the type rule sees the same means as the pipeline for every
    solid nucleus (the pipeline averages a rare non-solid one over its solid part). ``maps``: computes the maps
    instead of ``net`` (e.g. an int8 engine)."""
    h, w = s.image.shape[:2]
    img = model_grid(s, card)
    np_prob, hv, tp = maps(img) if maps is not None else run_network(net, card, img, bf16=bf16, views=views)
    params = WatershedParams(**card.postprocess) if card.postprocess else WatershedParams()
    px = LabelledPixels(separate_instances(np_prob, hv, card.mpp, params))
    n_types = 0 if tp is None else tp.n_types
    sums = px.sums(() if tp is None else tuple(tp.take(px.y, px.x)))
    ids = np.flatnonzero(sums.count[1:]) + 1
    if not len(ids):
        return np.zeros((0, 2)), np.zeros((0, n_types))
    cyx = sums.moments[ids, :2] / sums.count[ids, None]  # pixel-index centroids (y, x): integer sums
    xy = (cyx[:, ::-1] + 0.5) * (w / img.shape[1], h / img.shape[0]) - 0.5
    means = np.stack([sums.mean(ids, c) for c in range(n_types)], axis=1) if n_types else np.zeros((len(ids), 0))
    return xy, means


@dataclass(frozen=True)
class TypedImage:
    """One point-annotated image's typed detections: the predicted centroids ``xy`` (x, y, native px) and mean
    class probabilities ``means`` (N, C; ``C = 0`` for an untyped model), the true points, their classes
    (CRCHisto label order, 0 = no class), and their match within ``radius_um``. The network ran once: every
    class rule (:func:`classify`) and radius (:meth:`at_radius`) is scored on the same detections."""

    name: str
    xy: np.ndarray
    means: np.ndarray
    points: np.ndarray
    true_classes: np.ndarray
    mpp: float
    radius_um: float
    match: PointMatch

    def at_radius(self, radius_um: float) -> TypedImage:
        """The same detections matched within another radius."""
        match = match_points(self.points, self.xy, radius_um / self.mpp)
        return replace(self, radius_um=float(radius_um), match=match)


def typed_images(
    net: Any,
    card: Any,
    samples: Sequence[Sample],
    radius_um: float,
    bf16: bool = False,
    views: int = 1,
    maps: MapsFn | None = None,
) -> list[TypedImage]:
    """Run the model once per image (:func:`typed_nuclei_native`) and match its nuclei to the image's points."""
    out = []
    for s in samples:
        if s.points is None or s.point_classes is None:
            raise ConfigError(f"image {s.name} has no classified points to score types against")
        xy, means = typed_nuclei_native(net, card, s, bf16, views, maps)
        match = match_points(s.points, xy, radius_um / s.mpp)
        out.append(TypedImage(s.name, xy, means, s.points, s.point_classes, s.mpp, float(radius_um), match))
    return out


def classify(images: Sequence[TypedImage], weights: Sequence[float] | None, lut: np.ndarray) -> ClassificationResult:
    """CRCHisto-protocol scores of ``images`` typed by the pipeline's rule
    (:func:`histoseg.postprocess.decide_types`: the highest mean probability after ``weights``; None: plain
    highest); ``lut`` maps model classes to CRCHisto classes (:func:`crchisto_lut`). An untyped model's
    nuclei are all its class 1."""
    tally = ClassificationTally(classes=tuple(range(1, len(CRCHISTO_CLASSES) + 1)))
    w = None if weights is None else tuple(weights)
    for im in images:
        if im.means.shape[1] and len(im.means):
            pred = decide_types(im.means, w).astype(np.int64) + 1
        else:
            pred = np.ones(len(im.xy), np.int64)
        tally.add_match(im.match, im.true_classes, lut[pred])
    return tally.result()


def typing_scores(images: Sequence[TypedImage], weights: Sequence[float] | None, lut: np.ndarray) -> dict[str, Any]:
    """:func:`classify`'s figures as a JSON-ready dict (the card's ``crchisto_typing``, the benchmark's rows)."""
    r = classify(images, weights, lut)
    radii = {im.radius_um for im in images}
    if len(radii) > 1:
        raise ConfigError(f"images matched within different radii: {sorted(radii)}")
    return {
        "radius_um": radii.pop() if radii else float("nan"),
        "n_images": len(images),
        "det_precision": r.detection_precision,
        "det_recall": r.detection_recall,
        "det_f1": r.detection_f1,
        "weighted_f1": r.weighted_f1,
        "accuracy": r.accuracy,
        "per_class_f1": {CRCHISTO_CLASSES[c - 1]: v for c, v in r.per_class_f1.items()},
        "hovernet_fc": {CRCHISTO_CLASSES[c - 1]: v for c, v in r.hovernet_fc.items()},
    }


def crchisto_lut(class_names: Sequence[str]) -> np.ndarray:
    """Model class (0 = none, 1..C in card order) -> CRCHisto class (1..4), matched by name through
    ``labels.CRCHISTO_TO_TYPES``; 0 where the model's class has no CRCHisto counterpart."""
    from histoseg.training.labels import CRCHISTO_TO_TYPES

    to_crc = {t: CRCHISTO_CLASSES.index(c) + 1 for c, t in CRCHISTO_TO_TYPES.items()}
    return np.array([0] + [to_crc.get(n, 0) for n in class_names], dtype=np.int64)


def score_typing(
    net: Any, card: Any, limit: int | None = None, bf16: bool = False, radius_um: float | None = None, views: int = 1
) -> dict[str, Any]:
    """Detection and classification F1 on CRCHisto validation (Sirinukunwattana et al. 2016 protocol:
    centroids matched within 6 px at 20x, i.e. 3.3 µm; classes scored on the detected nuclei). The model's
    types are compared with CRCHisto's classes by name (``labels.CRCHISTO_TO_TYPES``); a type with no
    CRCHisto counterpart counts as "no class". ``radius_um`` overrides the matching radius."""
    radius = RADIUS_UM["crchisto-val"] if radius_um is None else float(radius_um)
    samples = first(load_crchisto("validation", None), limit)
    images = typed_images(net, card, samples, radius, bf16, views)
    return typing_scores(images, card.type_weights, crchisto_lut(card.class_names))
