"""Metrics on hand-built cases with answers worked out on paper, plus a brute-force cross-check."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from skimage.measure import regionprops

from histoseg.errors import ConfigError, DatasetError
from histoseg.metrics import (
    DetectionTally,
    OverlapTable,
    PQResult,
    aji,
    aji_plus,
    centroids,
    detection_counts,
    detection_f1,
    dice,
    evaluate_instances,
    match_points,
    mean_over_images,
    panoptic_quality,
    relabel,
)

# --------------------------------------------------------------------------------------------------
# Hand-built maps (10 x 10).


def blank() -> np.ndarray:
    return np.zeros((10, 10), np.int32)


def two_nuclei() -> np.ndarray:
    """g1: rows 1-4, cols 1-4 (16 px); g2: rows 6-8, cols 6-8 (9 px)."""
    m = blank()
    m[1:5, 1:5] = 1
    m[6:9, 6:9] = 2
    return m


def all_scores(true: np.ndarray, pred: np.ndarray) -> tuple[float, float, float, PQResult]:
    return dice(true, pred), aji(true, pred), aji_plus(true, pred), panoptic_quality(true, pred)


def check_pq(res: PQResult, dq: float, sq: float, pq: float, tp: int, fp: int, fn: int) -> None:
    assert (res.tp, res.fp, res.fn) == (tp, fp, fn)
    assert res.dq == pytest.approx(dq, abs=1e-12)
    assert res.sq == pytest.approx(sq, abs=1e-12)
    assert res.pq == pytest.approx(pq, abs=1e-12)


def test_identical_maps_score_one() -> None:
    t = two_nuclei()
    d, a, ap, pq = all_scores(t, t * 5)  # other ids, same partition
    assert d == a == ap == 1.0
    check_pq(pq, 1.0, 1.0, 1.0, 2, 0, 0)


def test_split_nucleus_unequal_halves() -> None:
    # GT: one 4x4 nucleus (16 px). Prediction: left 4x3 part (12 px, id 1) + right 4x1 column (4 px, id 2).
    # IoU(g, p1) = 12/16 = 0.75, IoU(g, p2) = 4/16 = 0.25.
    # AJI: g takes p1; C = 12, U = 16 (union g/p1) + 4 (p2 untaken) = 20 -> 0.6. AJI+: same pair -> 0.6.
    # PQ: TP = 1 (0.75), FP = 1 (p2), FN = 0 -> DQ = 1/(1 + 0.5) = 2/3, SQ = 0.75, PQ = 0.5.
    # Dice: same foreground -> 1.
    t = blank()
    t[2:6, 2:6] = 1
    p = blank()
    p[2:6, 2:5] = 1
    p[2:6, 5:6] = 2
    d, a, ap, pq = all_scores(t, p)
    assert d == 1.0
    assert a == pytest.approx(0.6)
    assert ap == pytest.approx(0.6)
    check_pq(pq, 2 / 3, 0.75, 0.5, 1, 1, 0)


def test_split_nucleus_equal_halves_is_not_a_pq_match() -> None:
    # GT 4x4 (16 px) split into two 4x2 halves (8 px each): both IoU = 8/16 = 0.5.
    # AJI: g takes one half (either): C = 8, U = 16 + 8 (other half untaken) = 24 -> 1/3. AJI+ = 1/3.
    # PQ at IoU > 0.5 (strict): no match -> TP 0, FP 2, FN 1, DQ = SQ = PQ = 0.
    # PQ at IoU > 0.4: one half matches -> TP 1, FP 1, FN 0, DQ = 2/3, SQ = 0.5, PQ = 1/3.
    t = blank()
    t[2:6, 2:6] = 1
    p = blank()
    p[2:6, 2:4] = 1
    p[2:6, 4:6] = 2
    d, a, ap, pq = all_scores(t, p)
    assert d == 1.0
    assert a == pytest.approx(1 / 3)
    assert ap == pytest.approx(1 / 3)
    check_pq(pq, 0.0, 0.0, 0.0, 0, 2, 1)
    check_pq(panoptic_quality(t, p, iou_threshold=0.4), 2 / 3, 0.5, 1 / 3, 1, 1, 0)


def test_aji_exact_iou_tie_takes_smallest_prediction_id() -> None:
    # GT g: rows 0-3 x cols 0-5 (24 px). Prediction a: rows 0-3 x cols 0-1 (8 px, inside g);
    # prediction b: rows 0-3 x cols 3-8 (24 px, 12 inside g). IoU(g, a) = 8/24 = 1/3 = 12/36 = IoU(g, b).
    # Taking a: C = 8, U = 24 + 24 (b untaken) = 48 -> 1/6. Taking b: C = 12, U = 36 + 8 (a untaken) = 44
    # -> 3/11. As HoVer-Net's argmax, the tie goes to the smaller id, so the ids decide here.
    t = np.zeros((4, 10), np.int32)
    t[:, 0:6] = 1
    p = np.zeros_like(t)
    p[:, 0:2] = 1
    p[:, 3:9] = 2
    assert aji(t, p) == pytest.approx(1 / 6)
    swapped = np.select([p == 1, p == 2], [2, 1], 0)
    assert aji(t, swapped) == pytest.approx(3 / 11)


def test_merged_pair() -> None:
    # GT: g1 rows 2-5 x cols 1-5 (20 px), g2 rows 2-5 x cols 6-7 (8 px), touching.
    # Prediction: one blob rows 2-5 x cols 1-7 (28 px) = g1 + g2.
    # IoU(g1, p) = 20/28 = 5/7, IoU(g2, p) = 8/28 = 2/7.
    # AJI: both GTs take p: C = 20 + 8 = 28, U = 28 + 28 = 56 -> 0.5.
    # AJI+: p goes to g1 only: C = 20, U = 28 + 8 (g2 unpaired) = 36 -> 5/9.
    # PQ: TP 1 (5/7), FP 0, FN 1 -> DQ = 1/1.5 = 2/3, SQ = 5/7, PQ = 10/21. Dice = 1.
    t = blank()
    t[2:6, 1:6] = 1
    t[2:6, 6:8] = 2
    p = blank()
    p[2:6, 1:8] = 7
    d, a, ap, pq = all_scores(t, p)
    assert d == 1.0
    assert a == pytest.approx(0.5)
    assert ap == pytest.approx(5 / 9)
    check_pq(pq, 2 / 3, 5 / 7, 10 / 21, 1, 0, 1)


def test_empty_prediction_and_empty_truth() -> None:
    # Nothing predicted: C = 0, U = 25 -> AJI = AJI+ = 0; Dice = 0/25 = 0; PQ: FN 2 -> 0.
    t = two_nuclei()
    d, a, ap, pq = all_scores(t, blank())
    assert (d, a, ap) == (0.0, 0.0, 0.0)
    check_pq(pq, 0.0, 0.0, 0.0, 0, 0, 2)
    # Nothing true, two predictions: all 0, FP 2.
    d, a, ap, pq = all_scores(blank(), t)
    assert (d, a, ap) == (0.0, 0.0, 0.0)
    check_pq(pq, 0.0, 0.0, 0.0, 0, 2, 0)
    # Both empty: 1.0 by convention.
    d, a, ap, pq = all_scores(blank(), blank())
    assert (d, a, ap) == (1.0, 1.0, 1.0)
    check_pq(pq, 1.0, 1.0, 1.0, 0, 0, 0)


def test_shifted_prediction() -> None:
    # GT 4x4 at cols 2-5, prediction the same square at cols 3-6: intersection 4x3 = 12, union 20.
    # IoU = 0.6 -> AJI = AJI+ = 0.6, PQ: TP 1, DQ 1, SQ 0.6, PQ 0.6. Dice = 2*12/(16+16) = 0.75.
    t = blank()
    t[2:6, 2:6] = 1
    p = blank()
    p[2:6, 3:7] = 1
    d, a, ap, pq = all_scores(t, p)
    assert d == pytest.approx(0.75)
    assert a == pytest.approx(0.6)
    assert ap == pytest.approx(0.6)
    check_pq(pq, 1.0, 0.6, 0.6, 1, 0, 0)


def test_extra_false_positive_blob() -> None:
    # Prediction = GT (16 + 9 px) plus a 2x3 blob (6 px) touching nothing.
    # Dice = 2*25/(25+31) = 25/28. AJI = AJI+ = 25/(25 + 6) = 25/31.
    # PQ: TP 2 (IoU 1), FP 1 -> DQ = 2/2.5 = 0.8, SQ = 1, PQ = 0.8.
    t = two_nuclei()
    p = t.copy()
    p[0:2, 7:10] = 3
    d, a, ap, pq = all_scores(t, p)
    assert d == pytest.approx(25 / 28)
    assert a == pytest.approx(25 / 31)
    assert ap == pytest.approx(25 / 31)
    check_pq(pq, 0.8, 1.0, 0.8, 2, 1, 0)


def test_relabel_and_input_forms() -> None:
    m = np.array([[0, 40, 40], [7, 0, 1000]])
    assert relabel(m).tolist() == [[0, 2, 2], [1, 0, 3]]
    assert relabel(np.array([[5, 5], [9, 9]])).tolist() == [[1, 1], [2, 2]]  # no background
    big = np.array([[0, 2**40], [3, 2**40]], np.int64)  # sparse huge ids take the np.unique path
    assert relabel(big).tolist() == [[0, 2], [1, 2]]
    t = two_nuclei()
    assert aji(t.astype(np.float64), t.astype(np.uint16)) == 1.0  # integral floats are accepted
    assert dice(t > 0, t) == 1.0  # a boolean map is one instance


def test_invalid_inputs_raise_histoseg_errors() -> None:
    t = two_nuclei()
    with pytest.raises(DatasetError):
        aji(t, t[:5])
    with pytest.raises(DatasetError):
        dice(-t, t)
    with pytest.raises(DatasetError):
        dice(t + 0.5, t)
    with pytest.raises(DatasetError):
        dice(t[None], t[None])
    with pytest.raises(ConfigError):
        panoptic_quality(t, t, iou_threshold=1.0)
    with pytest.raises(ConfigError):
        match_points([[0, 0]], [[0, 0]], radius=0)
    with pytest.raises(DatasetError):
        match_points([[0, 0, 0]], [[0, 0]], radius=1)
    with pytest.raises(ConfigError):
        evaluate_instances(t, t, mpp=0.0, radius_um=3.0)
    with pytest.raises(DatasetError):
        mean_over_images([])


# --------------------------------------------------------------------------------------------------
# Random maps: permutation invariance and a brute-force reference.


def random_map(rng: np.random.Generator, n: int, shape: tuple[int, int] = (20, 20)) -> np.ndarray:
    """Up to ``n`` random rectangles; later ones overwrite earlier ones (some may vanish)."""
    m = np.zeros(shape, np.int64)
    for k in range(1, n + 1):
        y, x = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
        h, w = rng.integers(2, 9), rng.integers(2, 9)
        m[y : y + h, x : x + w] = k
    return m


def random_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    t = random_map(rng, int(rng.integers(0, 6)))
    kind = rng.integers(0, 3)
    if kind == 0:
        p = random_map(rng, int(rng.integers(0, 6)))
    else:  # a perturbed copy: shifted, maybe a cut (split) and a merge
        p = np.roll(t, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
        if kind == 2 and p.max() > 0:
            cut = int(rng.integers(0, p.shape[1]))
            p[:, cut:] = np.where(p[:, cut:] > 0, p[:, cut:] + 100, 0)
            a, b = rng.integers(1, p.max() + 1, 2)
            p[p == a] = b
    return t, p


def shuffle_ids(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ids = np.unique(m)
    ids = ids[ids > 0]
    new = rng.choice(10**6, ids.size, replace=False) + 1
    out = np.zeros_like(m)
    for old, nw in zip(ids, new, strict=True):
        out[m == old] = nw
    return out


def test_permuted_label_ids_give_same_scores() -> None:
    rng = np.random.default_rng(1)
    for _ in range(30):
        t, p = random_pair(rng)
        ref = evaluate_instances(t, p, mpp=0.5, radius_um=2.0)
        got = evaluate_instances(shuffle_ids(t, rng), shuffle_ids(p, rng), mpp=0.5, radius_um=2.0)
        assert got == pytest.approx(ref, abs=1e-12)


def matchings(edges: dict[tuple[int, int], float], rows: list[int]) -> Iterator[list[tuple[int, int]]]:
    """Every one-to-one matching using only ``edges`` (brute force)."""

    def rec(i: int, used: frozenset[int], acc: list[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
        if i == len(rows):
            yield list(acc)
            return
        yield from rec(i + 1, used, acc)  # row i unmatched
        for r, c in edges:
            if r == rows[i] and c not in used:
                yield from rec(i + 1, used | {c}, [*acc, (r, c)])

    yield from rec(0, frozenset(), [])


def brute_force(t: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """Slow reference straight from docs/metrics.md, on the raw ids (no relabelling)."""
    tid = [int(i) for i in np.unique(t) if i > 0]
    pid = [int(i) for i in np.unique(p) if i > 0]
    area_t = {g: int((t == g).sum()) for g in tid}
    area_p = {q: int((p == q).sum()) for q in pid}
    inter = {(g, q): int(((t == g) & (p == q)).sum()) for g in tid for q in pid}
    union = {k: area_t[k[0]] + area_p[k[1]] - v for k, v in inter.items()}
    iou = {k: inter[k] / union[k] for k in inter}
    edges = {k: v for k, v in iou.items() if v > 0}

    def aji_of(pairs: list[tuple[int, int]]) -> float:
        if not tid and not pid:
            return 1.0
        c = sum(inter[k] for k in pairs)
        u = sum(union[k] for k in pairs)
        u += sum(area_t[g] for g in tid if g not in {k[0] for k in pairs})
        u += sum(area_p[q] for q in pid if q not in {k[1] for k in pairs})
        return c / u

    # AJI: each GT takes its max-IoU prediction (ties: smallest id), pairs with IoU > 0 only.
    aji_pairs = []
    for g in tid:
        cand = [(iou[(g, q)], -q) for q in pid if iou[(g, q)] > 0]
        if cand:
            aji_pairs.append((g, -max(cand)[1]))
    # AJI+: all maximum-total-IoU matchings (several may tie); collect their AJI values.
    all_m = list(matchings(edges, tid))
    best = max(sum(edges[k] for k in m) for m in all_m)
    aji_plus_values = [aji_of(m) for m in all_m if sum(edges[k] for k in m) > best - 1e-12]
    # PQ at 0.5: all pairs with IoU > 0.5.
    pq_pairs = [k for k, v in iou.items() if v > 0.5]
    # PQ at 0.3: maximum cardinality, then maximum total IoU among pairs with IoU > 0.3.
    e3 = {k: v for k, v in edges.items() if v > 0.3}
    m3 = max(matchings(e3, tid), key=lambda m: (len(m), sum(e3[k] for k in m)))
    return {
        "dice": 2 * sum(inter.values()) / max(sum(area_t.values()) + sum(area_p.values()), 1)
        if tid or pid
        else 1.0,
        "aji": aji_of(aji_pairs),
        "aji_plus_values": aji_plus_values,
        "pq_tp": len(pq_pairs),
        "pq_sq": float(np.mean([iou[k] for k in pq_pairs])) if pq_pairs else 0.0,
        "pq3_tp": len(m3),
        "pq3_sq": float(np.mean([iou[k] for k in m3])) if m3 else 0.0,
        "n": (len(tid), len(pid)),
    }


def test_random_maps_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(150):
        t, p = random_pair(rng)
        ref = brute_force(t, p)
        table = OverlapTable.from_maps(t, p)
        assert (table.n_true, table.n_pred) == ref["n"]
        assert table.dice() == pytest.approx(ref["dice"], abs=1e-12)
        assert table.aji() == pytest.approx(ref["aji"], abs=1e-12)
        got = table.aji_plus()
        assert any(got == pytest.approx(v, abs=1e-12) for v in ref["aji_plus_values"])
        n_t, n_p = table.n_true, table.n_pred
        for thr, tp_key, sq_key in ((0.5, "pq_tp", "pq_sq"), (0.3, "pq3_tp", "pq3_sq")):
            pq = table.panoptic_quality(thr)
            if n_t == n_p == 0:
                assert pq == (1.0, 1.0, 1.0, 0, 0, 0)
                continue
            assert (pq.tp, pq.fp, pq.fn) == (ref[tp_key], n_p - pq.tp, n_t - pq.tp)
            assert pq.sq == pytest.approx(ref[sq_key], abs=1e-12)


def brute_force_points(t: np.ndarray, p: np.ndarray, r: float) -> tuple[int, float]:
    """Best (count, -total distance) over every one-to-one matching within ``r``."""
    edges = {(i, j): float(np.hypot(*(t[i] - p[j]))) for i in range(len(t)) for j in range(len(p))}
    edges = {k: d for k, d in edges.items() if d <= r}
    best = max(matchings(edges, list(range(len(t)))), key=lambda m: (len(m), -sum(edges[k] for k in m)))
    return len(best), sum(edges[k] for k in best)


def test_random_points_match_brute_force() -> None:
    rng = np.random.default_rng(2)
    for _ in range(150):
        t = rng.uniform(0, 10, (int(rng.integers(0, 7)), 2))
        p = rng.uniform(0, 10, (int(rng.integers(0, 7)), 2))
        r = float(rng.uniform(0.5, 4))
        m = match_points(t, p, r)
        n, total = brute_force_points(t, p, r)
        assert m.tp == n and m.fp == len(p) - n and m.fn == len(t) - n
        assert len(set(m.pairs[:, 0])) == len(set(m.pairs[:, 1])) == n
        d = np.hypot(*(t[m.pairs[:, 0]] - p[m.pairs[:, 1]]).T) if n else np.zeros(0)
        assert (d <= r).all()
        assert d.sum() == pytest.approx(total, abs=1e-9)


# --------------------------------------------------------------------------------------------------
# Detection.


def test_point_just_inside_and_just_outside_radius() -> None:
    # radius 5: (0,0)-(3,4) is exactly 5 -> matched (inclusive); (100,100)-(103,104.01) is > 5 -> not.
    m = match_points([[0.0, 0.0], [100.0, 100.0]], [[3.0, 4.0], [103.0, 104.01]], radius=5.0)
    assert m.pairs.tolist() == [[0, 0]]
    assert (m.tp, m.fp, m.fn) == (1, 1, 1)


def test_hungarian_beats_greedy_nearest_first() -> None:
    # T1 (0,0), T2 (2.5,0); P1 (1,0), P2 (-2,0); radius 2.2.
    # Distances: T1-P1 1.0, T2-P1 1.5, T1-P2 2.0, T2-P2 4.5 (out).
    # Greedy nearest-first takes T1-P1, leaving T2 and P2 unmatched: 1 TP.
    # One-to-one optimum: T1-P2 and T2-P1: 2 TP.
    m = match_points([[0.0, 0.0], [2.5, 0.0]], [[1.0, 0.0], [-2.0, 0.0]], radius=2.2)
    assert m.pairs.tolist() == [[0, 1], [1, 0]]
    assert (m.tp, m.fp, m.fn) == (2, 0, 0)


def test_matching_maximises_matches_before_distance() -> None:
    # T1 (0,0), T2 (-1,3); P1 (1,0), P2 (-4,-2); radius 5.
    # T1-P1 = 1, T2-P2 = sqrt(34) ~ 5.83 (out), T1-P2 = sqrt(20) ~ 4.47, T2-P1 = sqrt(13) ~ 3.61.
    # Minimising total distance over full assignments first (1 + 5.83 < 4.47 + 3.61) and then dropping
    # out-of-radius pairs would give 1 TP; matching only within the radius gives 2 TP.
    m = match_points([[0, 0], [-1, 3]], [[1, 0], [-4, -2]], radius=5.0)
    assert (m.tp, m.fp, m.fn) == (2, 0, 0)
    # Among equally many matches the closer prediction wins: T (0,0) with P (3,0) or P (1,0) -> P index 1.
    m = match_points([[0, 0]], [[3, 0], [1, 0]], radius=5.0)
    assert m.pairs.tolist() == [[0, 1]]
    assert detection_counts([], [[1, 1]], radius=5.0) == (0, 1, 0)


def test_detection_f1_pools_counts_over_images() -> None:
    # Image A: one point found (TP 1). Image B: no GT, 3 predictions (FP 3).
    # Pooled F1 = 2*1 / (2*1 + 3 + 0) = 0.4 (the mean of per-image F1s would be (1 + 0)/2 = 0.5).
    images = [
        (np.array([[5, 5]]), np.array([[5, 6]])),
        (np.zeros((0, 2)), np.array([[1, 1], [2, 2], [3, 3]])),
    ]
    assert detection_f1(images, radius=3.0) == pytest.approx(0.4)
    tally = DetectionTally()
    for true_xy, pred_xy in images:
        tally.add(true_xy, pred_xy, radius=3.0)
    assert (tally.tp, tally.fp, tally.fn) == (1, 3, 0)
    assert tally.precision == pytest.approx(0.25)
    assert tally.recall == 1.0
    empty = DetectionTally()
    assert (empty.precision, empty.recall, empty.f1) == (1.0, 1.0, 1.0)


def test_centroids_xy_order_and_regionprops_agreement() -> None:
    # g1 rows 1-4, cols 1-4 -> (x, y) = (2.5, 2.5); g2 rows 6-8, cols 6-8 -> (7, 7).
    t = two_nuclei()
    assert centroids(t).tolist() == [[2.5, 2.5], [7.0, 7.0]]
    rng = np.random.default_rng(3)
    m = random_map(rng, 6)
    ref = [(r.centroid[1], r.centroid[0]) for r in regionprops(m)]  # regionprops: (row, col), by label
    assert centroids(m) == pytest.approx(np.array(ref).reshape(-1, 2))
    assert centroids(blank()).shape == (0, 2)


# --------------------------------------------------------------------------------------------------
# Summary.


def test_evaluate_and_mean_over_images() -> None:
    # Merged-pair case (see test_merged_pair) at 0.5 µm/px with a 2 µm radius = 4 px.
    # Centroids (x, y): g1 (3, 3.5), g2 (6.5, 3.5), prediction (4, 3.5): distances 1 and 2.5, both within
    # 4 px; the single prediction goes to the closer g1 -> TP 1, FP 0, FN 1.
    t = blank()
    t[2:6, 1:6] = 1
    t[2:6, 6:8] = 2
    p = blank()
    p[2:6, 1:8] = 1
    row = evaluate_instances(t, p, mpp=0.5, radius_um=2.0)
    assert row == pytest.approx(
        {
            "dice": 1.0,
            "aji": 0.5,
            "aji_plus": 5 / 9,
            "dq": 2 / 3,
            "sq": 5 / 7,
            "pq": 10 / 21,
            "det_tp": 1.0,
            "det_fp": 0.0,
            "det_fn": 1.0,
        }
    )
    # Averaging: identical maps (all 1, TP 2) and an empty prediction (all 0, FN 2).
    # Means 0.5; pooled detection TP 2, FP 0, FN 2 -> precision 1, recall 0.5, F1 = 4/6.
    g = two_nuclei()
    rows = [evaluate_instances(g, g, 0.5, 2.0), evaluate_instances(g, blank(), 0.5, 2.0)]
    out = mean_over_images(rows)
    for k in ("dice", "aji", "aji_plus", "dq", "sq", "pq"):
        assert out[k] == pytest.approx(0.5)
    assert (out["det_tp"], out["det_fp"], out["det_fn"], out["n_images"]) == (2, 0, 2, 2)
    assert out["det_precision"] == 1.0
    assert out["det_recall"] == pytest.approx(0.5)
    assert out["det_f1"] == pytest.approx(2 / 3)


def test_speed_on_a_large_image() -> None:
    # 1000 x 1000 with 625 disc nuclei; prediction shifted by 2 px with every 7th nucleus dropped.
    yy, xx = np.mgrid[:1000, :1000]
    cy, cx = (yy % 40) - 20, (xx % 40) - 20
    t = np.where(cy**2 + cx**2 <= 14**2, (yy // 40) * 25 + xx // 40 + 1, 0)
    p = np.roll(t, 2, axis=1)
    p[p % 7 == 0] = 0
    for f in (dice, aji, aji_plus, panoptic_quality):
        start = time.perf_counter()
        f(t, p)
        assert time.perf_counter() - start < 1.0, f.__name__
    start = time.perf_counter()
    row = evaluate_instances(t, p, mpp=0.5, radius_um=6.0)
    assert time.perf_counter() - start < 1.0
    assert (row["det_tp"], row["det_fp"], row["det_fn"]) == (625 - 89, 0, 89)
    assert math.isclose(row["dq"], 536 / (536 + 89 / 2))
