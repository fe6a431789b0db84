"""Joint detection and classification scores for typed nucleus centroids (CRCHisto-style), pooled over images.

Each image gives true and predicted ``(x, y)`` points with one integer class per point. Points are matched
one-to-one within ``radius`` by :func:`histoseg.metrics.detection.match_points` (inclusive radius, most
matches first, then least total distance); detection precision, recall and F1 follow
:class:`~histoseg.metrics.detection.DetectionTally`, including its empty conventions.

Classes are integers >= 1. A true class 0 means "a nucleus without a class": it counts for detection and
is left out of every classification count (a matched pair whose truth is 0 is neither right nor wrong). A
predicted class 0 means the model gave no class: it counts for detection, and a matched true nucleus of
class c predicted as 0 is a miss for c.

For a class c, over the matched pairs (the *detected* nuclei) let ``TP_c`` = pairs true c and predicted c,
``FN_c`` = pairs true c predicted otherwise, ``FP_c`` = pairs predicted c whose truth is another class >= 1;
over the unmatched points let ``FN_u,c`` = true c points left unmatched and ``FP_u,c`` = predicted c
points left unmatched. Two scores are reported because they answer different questions:

1. Sirinukunwattana et al., "Locality Sensitive Deep Learning for Detection and Classification of Nuclei
   in Routine Colon Cancer Histology Images", IEEE TMI 35(5):1196-1206, 2016 (the CRCHisto paper):
   detection is scored first (a detection within 6 px at 20x of a true centre is correct); the class
   labels are then scored on the detected nuclei only, with the F1 score of each class and the weighted
   average F1 score, each class's F1 weighted by its number of true nuclei. Here:
   ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)`` and
   ``weighted_f1 = sum_c S_c F1_c / sum_c S_c`` with the support ``S_c = TP_c + FN_c`` (true nuclei of
   class c among the detected ones, i.e. the "weighted" average of a multiclass F1 over the matched
   pairs). Missed and spurious nuclei do not enter: they are what the detection F1 measures. Caveat: the
   full paper text could not be retrieved while writing this; the definition follows its abstract, the
   project's notes (``docs/facts.md``: weighted classification F1 0.784 for NEP) and the standard
   weighted-F1 reading. ``ClassCounts.true`` is there to reweight by all true nuclei if one prefers.
2. Graham, Vu et al., "HoVer-Net: Simultaneous Segmentation and Classification of Nuclei in Multi-Tissue
   Histology Images", Medical Image Analysis 58:101563, 2019, and its reference code
   (``compute_stats.py``, ``run_nuclei_type_stat`` in github.com/vqdang/hover_net, read, not copied):
   ``F_c = 2 TP_c / (2 TP_c + 2 FP_c + 2 FN_c + FP_u,c + FN_u,c)`` (weights [2, 2, 1, 1]: a wrong class
   on a detected nucleus costs twice a missed or spurious nucleus of that class). The paper writes the
   numerator as ``2 (TP_c + TN_c)``; the code first keeps only the pairs in which c is the true or the
   predicted class, so ``TN_c`` is always 0 and we follow the code, which produced the published tables.
   Differences from that code, on purpose: truths of class 0 are ignored (the code would count a pair
   (0, c) as a false positive for c), and pairing is this project's matcher (the code runs one Hungarian
   assignment on distance over all points and then drops pairs beyond the radius, which can lose
   matches; it also rounds centroids to integers).

Radius: CRCHisto's convention is 6 px at 20x (about 3.3 µm at its 0.55 µm/px); HoVer-Net uses 12 px at 40x.

Undefined values are NaN, never a guess: a class F1 (either kind) whose denominator is 0 (the class
appears nowhere in the counts it uses), ``weighted_f1`` when no detected nucleus has a listed class, and
``accuracy`` when no detected nucleus has a class. Counts are pooled over images before any ratio is
taken (as in HoVer-Net's code), so a pooled tally equals one image holding all the points far apart.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike

from histoseg.errors import ConfigError, DatasetError
from histoseg.metrics.detection import DetectionTally, PointMatch, _as_points, match_points

__all__ = [
    "ClassCounts",
    "ClassificationResult",
    "ClassificationTally",
    "classification_f1",
]


def _as_classes(values: ArrayLike, n: int, name: str) -> np.ndarray:
    """One integer class >= 0 per point, as int64; floats are accepted when they hold whole numbers."""
    a = np.asarray(values)
    if a.size == 0 and n == 0:
        return np.zeros(0, np.int64)
    if a.ndim != 1 or len(a) != n:
        raise DatasetError(f"{name} must be a 1-D array with one class per point ({n} points), got shape {a.shape}")
    if a.dtype.kind in "iu":
        out = a.astype(np.int64)
    elif a.dtype.kind == "f":
        if not (np.isfinite(a).all() and (a == np.round(a)).all()):
            raise DatasetError(f"{name} must be whole numbers, got non-integer values")
        out = a.astype(np.int64)
    else:
        raise DatasetError(f"{name} must be integers, got dtype {a.dtype}")
    if (out < 0).any():
        raise DatasetError(f"{name} must be >= 0 (0 = no class), got {int(out.min())}")
    return out


def _check_classes(classes: Iterable[int] | None) -> tuple[int, ...] | None:
    if classes is None:
        return None
    out = tuple(classes)
    for c in out:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1:
            raise ConfigError(f"classes must be integers >= 1, got {c!r}")
    if len(set(out)) != len(out):
        raise ConfigError(f"classes must not repeat, got {out}")
    return tuple(int(c) for c in out)


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


@dataclass(frozen=True)
class ClassCounts:
    """Counts for one class c, pooled over images (see the module docstring for the symbols)."""

    true: int  # true nuclei of class c, matched or not
    pred: int  # predicted nuclei of class c, matched or not (matched to a class-0 truth included)
    tp: int  # matched pairs: true c, predicted c
    fn_matched: int  # matched pairs: true c, predicted another class (or 0)
    fp_matched: int  # matched pairs: predicted c, true another class >= 1
    fn_unmatched: int  # true c, no prediction within the radius
    fp_unmatched: int  # predicted c, no truth within the radius

    @property
    def support(self) -> int:
        """Detected true nuclei of class c (``TP_c + FN_c``): the class weight of ``weighted_f1``."""
        return self.tp + self.fn_matched


@dataclass(frozen=True)
class ClassificationResult:
    """Pooled detection and classification scores; per-class mappings are keyed by class, in ``classes`` order."""

    classes: tuple[int, ...]
    detection_tp: int
    detection_fp: int
    detection_fn: int
    detection_precision: float
    detection_recall: float
    detection_f1: float
    accuracy: float  # correct / detected nuclei with a true class >= 1 (all classes, listed or not)
    per_class_f1: Mapping[int, float]  # Sirinukunwattana: F1 over the detected nuclei
    weighted_f1: float  # Sirinukunwattana: per_class_f1 weighted by ClassCounts.support
    hovernet_fc: Mapping[int, float]  # HoVer-Net F_c, unmatched nuclei included
    counts: Mapping[int, ClassCounts]


@dataclass
class ClassificationTally:
    """Typed point counts pooled over images; ``add`` one image at a time, then ``result``.

    ``classes``: the classes to score, in report order; ``None`` scores every class >= 1 seen on either side.
    """

    classes: tuple[int, ...] | None = None
    detection: DetectionTally = field(default_factory=DetectionTally)
    pairs: Counter[tuple[int, int]] = field(default_factory=Counter)  # (true class, predicted class) -> n
    unmatched_true: Counter[int] = field(default_factory=Counter)  # class -> n
    unmatched_pred: Counter[int] = field(default_factory=Counter)  # class -> n

    def __post_init__(self) -> None:
        self.classes = _check_classes(self.classes)

    def add(
        self,
        true_xy: ArrayLike,
        true_classes: ArrayLike,
        pred_xy: ArrayLike,
        pred_classes: ArrayLike,
        radius: float,
    ) -> PointMatch:
        """Match one image's points, add its counts, and return its match.

        Every input is checked before anything is counted, so a rejected image leaves the tally unchanged.
        """
        t = _as_points(true_xy, "true points")
        p = _as_points(pred_xy, "predicted points")
        tc = _as_classes(true_classes, len(t), "true classes")
        pc = _as_classes(pred_classes, len(p), "predicted classes")
        m = match_points(t, p, radius)
        self._count(m, tc, pc)
        return m

    def add_match(self, match: PointMatch, true_classes: ArrayLike, pred_classes: ArrayLike) -> None:
        """Add one image whose points were matched already (``match`` from :func:`match_points` on that
        image's points), with new classes: scoring many class rules on the same detections matches once."""
        n_true = match.tp + match.fn
        n_pred = match.tp + match.fp
        tc = _as_classes(true_classes, n_true, "true classes")
        pc = _as_classes(pred_classes, n_pred, "predicted classes")
        if len(match.pairs) != match.tp:
            raise DatasetError(f"a match of {match.tp} true positives lists {len(match.pairs)} pairs")
        self._count(match, tc, pc)

    def _count(self, m: PointMatch, tc: np.ndarray, pc: np.ndarray) -> None:
        self.detection.add_counts(m.tp, m.fp, m.fn)
        ti, pi = m.pairs[:, 0], m.pairs[:, 1]
        self.pairs.update(zip(tc[ti].tolist(), pc[pi].tolist(), strict=True))
        left_t = np.ones(len(tc), bool)
        left_t[ti] = False
        left_p = np.ones(len(pc), bool)
        left_p[pi] = False
        self.unmatched_true.update(tc[left_t].tolist())
        self.unmatched_pred.update(pc[left_p].tolist())

    def observed_classes(self) -> tuple[int, ...]:
        """Sorted classes >= 1 seen so far on either side, matched or not."""
        seen = {c for pair in self.pairs for c in pair} | set(self.unmatched_true) | set(self.unmatched_pred)
        return tuple(sorted(c for c in seen if c >= 1))

    def class_counts(self, c: int) -> ClassCounts:
        """The pooled counts of class ``c``."""
        tp = fn_m = fp_m = n_true = n_pred = 0
        for (tcls, pcls), n in self.pairs.items():
            if tcls == c:
                n_true += n
                if pcls == c:
                    tp += n
                else:
                    fn_m += n
            if pcls == c:
                n_pred += n
                if tcls not in (c, 0):
                    fp_m += n
        fn_u, fp_u = self.unmatched_true[c], self.unmatched_pred[c]
        return ClassCounts(n_true + fn_u, n_pred + fp_u, tp, fn_m, fp_m, fn_u, fp_u)

    def result(self) -> ClassificationResult:
        """Scores from the pooled counts (see the module docstring for the definitions)."""
        classes = self.classes if self.classes is not None else self.observed_classes()
        counts = {c: self.class_counts(c) for c in classes}
        per_class = {c: _ratio(2 * k.tp, 2 * k.tp + k.fp_matched + k.fn_matched) for c, k in counts.items()}
        fc = {
            c: _ratio(2 * k.tp, 2 * (k.tp + k.fp_matched + k.fn_matched) + k.fp_unmatched + k.fn_unmatched)
            for c, k in counts.items()
        }
        support = sum(k.support for k in counts.values())
        weighted = (
            sum(k.support * per_class[c] for c, k in counts.items() if k.support) / support if support else math.nan
        )
        labelled = sum(n for (tcls, _), n in self.pairs.items() if tcls >= 1)
        correct = sum(n for (tcls, pcls), n in self.pairs.items() if tcls >= 1 and tcls == pcls)
        d = self.detection
        return ClassificationResult(
            classes=tuple(classes),
            detection_tp=d.tp,
            detection_fp=d.fp,
            detection_fn=d.fn,
            detection_precision=d.precision,
            detection_recall=d.recall,
            detection_f1=d.f1,
            accuracy=_ratio(correct, labelled),
            per_class_f1=per_class,
            weighted_f1=weighted,
            hovernet_fc=fc,
            counts=counts,
        )


def classification_f1(
    true_xy: ArrayLike,
    true_classes: ArrayLike,
    pred_xy: ArrayLike,
    pred_classes: ArrayLike,
    radius: float,
    classes: Iterable[int] | None = None,
) -> ClassificationResult:
    """Detection and classification scores of one image (use :class:`ClassificationTally` to pool images)."""
    tally = ClassificationTally(classes=_check_classes(classes))
    tally.add(true_xy, true_classes, pred_xy, pred_classes, radius)
    return tally.result()
