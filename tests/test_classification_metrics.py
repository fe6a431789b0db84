"""Typed-point metrics on hand-built cases with answers worked out on paper (comments), plus cross-checks.

Layout of every hand-built case: true nucleus i sits at (20 i, 5); its prediction, when there is one, at
(20 i + 1, 5), i.e. 1 px away. With radius 3 each prediction can only match its own truth, so which pairs
match is obvious and only the class counts are being tested.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import numpy as np
import pytest

from histoseg.errors import ConfigError, DatasetError
from histoseg.metrics import (
    ClassCounts,
    ClassificationResult,
    ClassificationTally,
    classification_f1,
    match_points,
)

R = 3.0


def at(indices: list[int], dx: float = 0.0) -> np.ndarray:
    """Points at (20 i + dx, 5) for the given slots i."""
    return np.array([[20.0 * i + dx, 5.0] for i in indices]).reshape(-1, 2)


def same(a: Any, b: Any, rel: float = 0.0) -> bool:
    """Equality of nested dicts/tuples of numbers where NaN equals NaN and floats may differ by ``rel``."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k], rel) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y, rel) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=rel, abs_tol=0.0) if rel else bool(a == b)
    return bool(a == b)


def test_perfect_prediction() -> None:
    # 4 truths, classes 1 1 2 3, each predicted 1 px away with its own class.
    # Detection: TP 4, FP 0, FN 0 -> P = R = F1 = 1. Every class: TP_c = its count, no errors -> all 1.
    res = classification_f1(at([0, 1, 2, 3]), [1, 1, 2, 3], at([0, 1, 2, 3], 1), [1, 1, 2, 3], R)
    assert res.classes == (1, 2, 3)
    assert (res.detection_tp, res.detection_fp, res.detection_fn) == (4, 0, 0)
    assert (res.detection_precision, res.detection_recall, res.detection_f1) == (1.0, 1.0, 1.0)
    assert res.per_class_f1 == {1: 1.0, 2: 1.0, 3: 1.0}
    assert res.hovernet_fc == {1: 1.0, 2: 1.0, 3: 1.0}
    assert res.weighted_f1 == 1.0 and res.accuracy == 1.0
    assert res.counts[1] == ClassCounts(
        true=2, pred=2, tp=2, fn_matched=0, fp_matched=0, fn_unmatched=0, fp_unmatched=0
    )


def test_all_classes_swapped() -> None:
    # Truths 1, 2 predicted as 2, 1. Detection is perfect (F1 1).
    # Class 1: TP 0, FN_c 1 (true 1 -> 2), FP_c 1 (true 2 -> 1): F1 = 0 / (0 + 1 + 1) = 0; class 2 alike.
    # HoVer-Net F_c = 0 / (0 + 2*1 + 2*1 + 0 + 0) = 0. Weighted 0, accuracy 0/2.
    res = classification_f1(at([0, 1]), [1, 2], at([0, 1], 1), [2, 1], R)
    assert res.detection_f1 == 1.0
    assert res.per_class_f1 == {1: 0.0, 2: 0.0}
    assert res.hovernet_fc == {1: 0.0, 2: 0.0}
    assert res.weighted_f1 == 0.0 and res.accuracy == 0.0
    assert res.counts[2] == ClassCounts(
        true=1, pred=1, tp=0, fn_matched=1, fp_matched=1, fn_unmatched=0, fp_unmatched=0
    )


def test_one_of_four_swapped_weights_by_support() -> None:
    # Truths 1 1 1 2, predicted 1 1 2 2 (the third class-1 nucleus called 2).
    # Class 1: TP 2, FN_c 1, FP_c 0 -> F1 = 4/5 = 0.8; support 3.
    # Class 2: TP 1, FN_c 0, FP_c 1 -> F1 = 2/3; support 1.
    # Weighted = (3 * 0.8 + 1 * 2/3) / 4 = (2.4 + 0.6667) / 4 = 0.76667 (the unweighted mean would be 0.7333).
    # HoVer-Net: F_1 = 4 / (4 + 2*1) = 2/3, F_2 = 2 / (2 + 2*1) = 1/2. Accuracy 3/4.
    res = classification_f1(at([0, 1, 2, 3]), [1, 1, 1, 2], at([0, 1, 2, 3], 1), [1, 1, 2, 2], R)
    assert res.per_class_f1[1] == pytest.approx(0.8)
    assert res.per_class_f1[2] == pytest.approx(2 / 3)
    assert res.weighted_f1 == pytest.approx((3 * 0.8 + 2 / 3) / 4)
    assert res.hovernet_fc[1] == pytest.approx(2 / 3)
    assert res.hovernet_fc[2] == pytest.approx(0.5)
    assert res.accuracy == pytest.approx(0.75)
    assert (res.counts[1].support, res.counts[2].support) == (3, 1)


def test_one_missed_nucleus() -> None:
    # Truths 1 2 2; the first two are predicted with the right class, the third (class 2) has no prediction.
    # Detection: TP 2, FP 0, FN 1 -> P 1, R 2/3, F1 = 4 / (4 + 1) = 0.8.
    # Sirinukunwattana (detected nuclei only): both classes perfect -> 1, weighted 1.
    # HoVer-Net class 2: TP 1, FN_u 1 -> 2 / (2 + 1) = 2/3; class 1 stays 1.
    res = classification_f1(at([0, 1, 2]), [1, 2, 2], at([0, 1], 1), [1, 2], R)
    assert (res.detection_tp, res.detection_fp, res.detection_fn) == (2, 0, 1)
    assert res.detection_recall == pytest.approx(2 / 3) and res.detection_f1 == pytest.approx(0.8)
    assert res.per_class_f1 == {1: 1.0, 2: 1.0} and res.weighted_f1 == 1.0
    assert res.hovernet_fc[1] == 1.0 and res.hovernet_fc[2] == pytest.approx(2 / 3)
    assert res.counts[2] == ClassCounts(
        true=2, pred=1, tp=1, fn_matched=0, fp_matched=0, fn_unmatched=1, fp_unmatched=0
    )


def test_one_false_positive() -> None:
    # Truths 1 2 predicted correctly, plus a class-1 prediction at slot 5 with no truth near it.
    # Detection: TP 2, FP 1, FN 0 -> P 2/3, R 1, F1 = 4/5.
    # Sirinukunwattana: 1 for both classes. HoVer-Net class 1: TP 1, FP_u 1 -> 2 / (2 + 1) = 2/3; class 2: 1.
    res = classification_f1(at([0, 1]), [1, 2], at([0, 1, 5], 1), [1, 2, 1], R)
    assert (res.detection_tp, res.detection_fp, res.detection_fn) == (2, 1, 0)
    assert res.detection_precision == pytest.approx(2 / 3) and res.detection_f1 == pytest.approx(0.8)
    assert res.per_class_f1 == {1: 1.0, 2: 1.0} and res.weighted_f1 == 1.0
    assert res.hovernet_fc[1] == pytest.approx(2 / 3) and res.hovernet_fc[2] == 1.0
    assert res.counts[1].fp_unmatched == 1 and res.counts[1].pred == 2


def test_class_absent_from_truth() -> None:
    # Truths 1 1, predicted 1 3: class 3 exists only in the prediction.
    # Class 1: TP 1, FN_c 1 -> F1 = 2/3, support 2.  Class 3: FP_c 1 -> F1 = 0 / 1 = 0, support 0.
    # Weighted = (2 * 2/3 + 0 * 0) / 2 = 2/3: a class with no true nucleus has weight 0.
    # HoVer-Net: F_1 = 2 / (2 + 2) = 1/2, F_3 = 0 / 2 = 0.
    res = classification_f1(at([0, 1]), [1, 1], at([0, 1], 1), [1, 3], R)
    assert res.classes == (1, 3)
    assert res.per_class_f1[1] == pytest.approx(2 / 3) and res.per_class_f1[3] == 0.0
    assert res.weighted_f1 == pytest.approx(2 / 3)
    assert res.hovernet_fc == {1: 0.5, 3: 0.0}
    # Listing class 2, which appears nowhere: its scores are undefined (NaN), the others do not move.
    res = classification_f1(at([0, 1]), [1, 1], at([0, 1], 1), [1, 3], R, classes=[1, 2, 3])
    assert res.classes == (1, 2, 3)
    assert math.isnan(res.per_class_f1[2]) and math.isnan(res.hovernet_fc[2])
    assert res.counts[2] == ClassCounts(0, 0, 0, 0, 0, 0, 0)
    assert res.weighted_f1 == pytest.approx(2 / 3)
    # Scoring class 1 only: class 3 is not reported but its wrong call still counts against class 1.
    res = classification_f1(at([0, 1]), [1, 1], at([0, 1], 1), [1, 3], R, classes=(1,))
    assert res.classes == (1,) and res.per_class_f1 == {1: pytest.approx(2 / 3)}


def test_unclassified_truths_count_for_detection_only() -> None:
    # Slot 0: truth class 0, predicted 2     -> detected; ignored by classification.
    # Slot 1: truth class 1, predicted 1     -> TP for class 1.
    # Slot 2: truth class 0, no prediction   -> detection FN; no class count.
    # Slot 3: truth class 1, predicted 0     -> detected; the model gave no class: FN_c for class 1.
    # Detection: TP 3, FP 0, FN 1 -> F1 = 6/7.
    # Class 1: TP 1, FN_c 1 -> F1 2/3, support 2; HoVer-Net 2 / (2 + 2) = 1/2.
    # Class 2: its one prediction sits on an unclassified truth, so no count uses it: F1 and F_c undefined.
    # Weighted = 2/3; accuracy = 1 correct / 2 detected nuclei with a class = 1/2.
    res = classification_f1(at([0, 1, 2, 3]), [0, 1, 0, 1], at([0, 1, 3], 1), [2, 1, 0], R)
    assert res.classes == (1, 2)
    assert (res.detection_tp, res.detection_fp, res.detection_fn) == (3, 0, 1)
    assert res.detection_f1 == pytest.approx(6 / 7)
    assert res.per_class_f1[1] == pytest.approx(2 / 3) and res.hovernet_fc[1] == pytest.approx(0.5)
    assert math.isnan(res.per_class_f1[2]) and math.isnan(res.hovernet_fc[2])
    assert res.counts[2] == ClassCounts(
        true=0, pred=1, tp=0, fn_matched=0, fp_matched=0, fn_unmatched=0, fp_unmatched=0
    )
    assert res.counts[1] == ClassCounts(
        true=2, pred=1, tp=1, fn_matched=1, fp_matched=0, fn_unmatched=0, fp_unmatched=0
    )
    assert res.weighted_f1 == pytest.approx(2 / 3) and res.accuracy == pytest.approx(0.5)


def test_pooled_counts_not_mean_of_images() -> None:
    # Image A: truths 1 1, predicted 1 1.  Image B: truth 2, predicted 1.
    # Pooled pairs: (1,1) x2, (2,1) x1. Class 1: TP 2, FP_c 1 -> 4/5; class 2: FN_c 1 -> 0.
    # Weighted = (2 * 0.8 + 1 * 0) / 3 = 0.5333; the mean of the per-image values would be (1 + 0) / 2 = 0.5.
    tally = ClassificationTally()
    tally.add(at([0, 1]), [1, 1], at([0, 1], 1), [1, 1], R)
    tally.add(at([0]), [2], at([0], 1), [1], R)
    res = tally.result()
    assert res.per_class_f1 == {1: pytest.approx(0.8), 2: 0.0}
    assert res.weighted_f1 == pytest.approx(1.6 / 3)


def test_two_images_pooled_equal_one_concatenated_image() -> None:
    # Image A: swaps, a miss, a false positive and an unclassified truth; image B: other mixes.
    # Image B shifted by 10 000 px and appended to A must give exactly the same result as pooling.
    a = (at([0, 1, 2, 3, 4]), [1, 2, 0, 3, 1], at([0, 1, 2, 4, 7], 1), [1, 1, 3, 1, 2])
    b = (at([0, 1, 2, 3]), [2, 2, 3, 4], at([0, 1, 3, 6, 8], 1), [2, 3, 0, 4, 4])
    tally = ClassificationTally()
    for tx, tc, px, pc in (a, b):
        tally.add(tx, tc, px, pc, R)
    pooled = tally.result()
    shift = np.array([10_000.0, 0.0])
    one = classification_f1(
        np.vstack([a[0], b[0] + shift]), a[1] + b[1], np.vstack([a[2], b[2] + shift]), a[3] + b[3], R
    )
    assert same(asdict(pooled), asdict(one))
    # And the pooled counts are the sums of the per-image counts.
    ra, rb = (classification_f1(*img, R, classes=pooled.classes) for img in (a, b))
    for c in pooled.classes:
        summed = [x + y for x, y in zip(asdict(ra.counts[c]).values(), asdict(rb.counts[c]).values(), strict=True)]
        assert list(asdict(pooled.counts[c]).values()) == summed


def test_empty_images() -> None:
    # No points at all: detection follows DetectionTally (1.0); there is nothing to classify (NaN).
    res = ClassificationTally().result()
    assert (res.detection_precision, res.detection_recall, res.detection_f1) == (1.0, 1.0, 1.0)
    assert res.classes == () and math.isnan(res.weighted_f1) and math.isnan(res.accuracy)
    res = classification_f1(np.zeros((0, 2)), [], [], [], R)
    assert res.detection_f1 == 1.0 and res.per_class_f1 == {}
    # Predictions only: detection 0; class 2 has FP_u 1 -> F_c = 0 / 1 = 0; Sirinukunwattana F1 undefined.
    res = classification_f1([], [], at([0]), [2], R)
    assert (res.detection_precision, res.detection_recall, res.detection_f1) == (0.0, 0.0, 0.0)
    assert res.hovernet_fc == {2: 0.0} and math.isnan(res.per_class_f1[2]) and math.isnan(res.weighted_f1)


def test_class_arrays_accept_whole_floats_and_numpy_ints() -> None:
    ref = classification_f1(at([0, 1]), [1, 2], at([0, 1], 1), [1, 1], R)
    res = classification_f1(at([0, 1]), np.array([1.0, 2.0]), at([0, 1], 1), np.array([1, 1], np.uint8), R)
    assert same(asdict(ref), asdict(res))


def test_invalid_inputs_raise_histoseg_errors() -> None:
    tx, px = at([0, 1]), at([0, 1], 1)
    with pytest.raises(DatasetError, match="one class per point"):
        classification_f1(tx, [1], px, [1, 1], R)  # 2 true points, 1 class
    with pytest.raises(DatasetError, match="one class per point"):
        classification_f1(tx, [1, 1], px, [1, 1, 1], R)  # 2 predicted points, 3 classes
    with pytest.raises(DatasetError, match="one class per point"):
        classification_f1(tx, [[1], [1]], px, [1, 1], R)  # not 1-D
    with pytest.raises(DatasetError, match="one class per point"):
        classification_f1([], [1], [], [], R)  # a class without a point
    with pytest.raises(DatasetError, match=">= 0"):
        classification_f1(tx, [1, -1], px, [1, 1], R)
    with pytest.raises(DatasetError, match="whole numbers"):
        classification_f1(tx, [1, 1.5], px, [1, 1], R)
    with pytest.raises(DatasetError, match="integers"):
        classification_f1(tx, ["a", "b"], px, [1, 1], R)
    with pytest.raises(DatasetError, match=r"\(N, 2\)"):
        classification_f1([[1, 2, 3]], [1], px, [1, 1], R)  # the detection module's point check
    with pytest.raises(ConfigError, match="radius"):
        classification_f1(tx, [1, 1], px, [1, 1], 0.0)
    for bad in ([0, 1], [1, 1], [1.5], [True]):
        with pytest.raises(ConfigError, match="classes"):
            ClassificationTally(classes=tuple(bad))  # type: ignore[arg-type]
    # A rejected image leaves the tally as it was.
    tally = ClassificationTally()
    tally.add(tx, [1, 2], px, [1, 2], R)
    before = asdict(tally.result())
    with pytest.raises(DatasetError):
        tally.add(tx, [1, 2], px, [1], R)
    with pytest.raises(ConfigError):
        tally.add(tx, [1, 2], px, [1, 2], -1.0)
    assert same(asdict(tally.result()), before)


# --------------------------------------------------------------------------------------------------
# Cross-check against the formulas written out nucleus by nucleus, on random images.


def reference(images: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], classes: list[int]) -> dict:
    """Per-class F1, weighted F1 and HoVer-Net F_c by walking every nucleus (matching from match_points)."""
    k = {c: dict(tp=0, fn=0, fp=0, fnu=0, fpu=0) for c in classes}
    for tx, tc, px, pc in images:
        m = match_points(tx, px, R)
        partner_of_true = {int(i): int(j) for i, j in m.pairs}
        partner_of_pred = {int(j): int(i) for i, j in m.pairs}
        for i, t in enumerate(tc):
            if t not in k:
                continue
            if i not in partner_of_true:
                k[t]["fnu"] += 1
            elif pc[partner_of_true[i]] == t:
                k[t]["tp"] += 1
            else:
                k[t]["fn"] += 1
        for j, p in enumerate(pc):
            if p not in k:
                continue
            if j not in partner_of_pred:
                k[p]["fpu"] += 1
            elif tc[partner_of_pred[j]] not in (p, 0):
                k[p]["fp"] += 1
    f1 = {
        c: 2 * v["tp"] / (2 * v["tp"] + v["fp"] + v["fn"]) if v["tp"] + v["fp"] + v["fn"] else math.nan
        for c, v in k.items()
    }
    fc_den = {c: 2 * (v["tp"] + v["fp"] + v["fn"]) + v["fpu"] + v["fnu"] for c, v in k.items()}
    fc = {c: 2 * k[c]["tp"] / d if d else math.nan for c, d in fc_den.items()}
    support = {c: v["tp"] + v["fn"] for c, v in k.items()}
    total = sum(support.values())
    weighted = sum(support[c] * f1[c] for c in classes if support[c]) / total if total else math.nan
    return {"f1": f1, "fc": fc, "weighted": weighted}


def test_random_images_match_nucleus_by_nucleus_reference() -> None:
    rng = np.random.default_rng(7)
    for _ in range(40):
        images = []
        for _ in range(int(rng.integers(1, 4))):
            nt, npred = int(rng.integers(0, 12)), int(rng.integers(0, 12))
            tx = rng.uniform(0, 40, (nt, 2))
            # Predictions near some truths plus a few anywhere, so that matches, misses and extras all occur.
            near = tx[: min(nt, npred)] + rng.normal(0, 1.5, (min(nt, npred), 2))
            px = np.vstack([near, rng.uniform(0, 40, (npred - len(near), 2))])
            images.append((tx, rng.integers(0, 4, nt), px, rng.integers(0, 4, npred)))
        tally = ClassificationTally(classes=(1, 2, 3))
        for img in images:
            tally.add(*img, R)
        res = tally.result()
        ref = reference(images, [1, 2, 3])
        assert same(dict(res.per_class_f1), ref["f1"], rel=1e-12)
        assert same(dict(res.hovernet_fc), ref["fc"], rel=1e-12)
        assert same(res.weighted_f1, ref["weighted"], rel=1e-12)


def test_result_is_frozen() -> None:
    res = classification_f1(at([0]), [1], at([0], 1), [1], R)
    assert isinstance(res, ClassificationResult)
    with pytest.raises(AttributeError):
        res.weighted_f1 = 0.0  # type: ignore[misc]
