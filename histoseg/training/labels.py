"""One unified label space over datasets that annotate different things (UniSeg, Kim et al. ECCV 2022).

Every training dataset declares what it labels (:class:`DatasetSpec`): instance masks, binary nucleus
masks, or centre points, and which of its own classes map to which *unified* nucleus type. The type head
has one independent sigmoid per unified type (no softmax), so a dataset trains exactly the types it
annotates and nothing else:

* its **class mask** (:meth:`DatasetSpec.class_mask`) says which unified types its labels speak about;
  at a nucleus pixel of a known type the annotated types get targets (1 for its type, 0 for the other
  annotated ones) and every other type gets no gradient at all;
* a nucleus whose type the dataset does not give (MoNuSeg has no types at all; a few CRCHisto points have
  no class) gets no type gradient (in stage 2 too when the dataset annotates every type, as CRCHisto does:
  its untyped points then have no relation row to learn from);
* background pixels are "no nucleus of any type": every type's target is 0 there. Each sigmoid means
  "a nucleus of this type covers this pixel", so this is what every dataset with nucleus labels knows;
* in stage 2 the **class relations** (:func:`relation_rows`, measured on the stage-1 model: the mean
  type probabilities over the pixels of each dataset label) become soft targets, with a small weight,
  for the types a dataset does not annotate, so MoNuSeg's "nucleus" supervises the types softly. The BCE
  averages over the supervised pixels (not over the weights), so a relation weight of 0.1 makes a relational
  pixel count a tenth of a hard one whatever the batch holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np

from histoseg.datasets import CRCHISTO_CLASSES
from histoseg.errors import ConfigError

LabelKind = Literal["instances", "points"]
LABEL_KINDS: tuple[LabelKind, ...] = ("instances", "points")
Propagation = Literal["randomwalk", "voronoi"]
PROPAGATIONS: tuple[Propagation, ...] = ("randomwalk", "voronoi")
DATASET_NAMES = ("monuseg", "crchisto")
DATASET_CLASSES: dict[str, tuple[str, ...]] = {"monuseg": (), "crchisto": CRCHISTO_CLASSES}
"""The class names each named dataset has (the keys a ``classes:`` mapping may use)."""

GENERIC_LABEL = "nucleus"
"""The dataset label of a nucleus whose type the dataset does not give (a row of the relation matrix)."""

DEFAULT_TYPES: tuple[str, ...] = ("Epithelial", "Fibroblast", "Inflammatory", "Other")
"""The shipped model's unified types: CRCHisto's four classes (Sirinukunwattana et al. 2016)."""

TYPE_COLORS: dict[str, tuple[int, int, int]] = {
    "Epithelial": (220, 40, 40),
    "Fibroblast": (60, 170, 60),
    "Inflammatory": (40, 90, 230),
    "Other": (240, 180, 0),
}
_PALETTE = ((150, 60, 200), (0, 170, 170), (230, 120, 30), (120, 120, 120), (200, 90, 150), (90, 60, 30))

CRCHISTO_TO_TYPES: dict[str, str] = {
    "epithelial": "Epithelial",
    "fibroblast": "Fibroblast",
    "inflammatory": "Inflammatory",
    "others": "Other",
}


def type_colors(names: Sequence[str]) -> tuple[tuple[int, int, int], ...]:
    """A colour per type: the fixed colours of the default types, a stable palette for others."""
    out = []
    spare = iter(_PALETTE * (1 + len(names) // len(_PALETTE)))
    for n in names:
        out.append(TYPE_COLORS.get(n) or next(spare))
    return tuple(out)


@dataclass(frozen=True)
class DatasetSpec:
    """One training dataset and the labels it carries (a ``datasets:`` entry of the training config).

    ``name``: ``monuseg`` (train split) or ``crchisto`` (train split). ``labels``: ``instances`` (masks as
    the dataset has them) or ``points`` (only nucleus centre points are used: CRCHisto always, MoNuSeg for
    the point-supervision ablation, its instance centroids). ``classes``: dataset class name -> unified
    type (empty: the dataset gives no types). ``share``: fraction of each batch drawn from it.
    ``propagation``: how points become dense labels (``randomwalk`` or the ``voronoi`` baseline).
    """

    name: str
    labels: LabelKind = "instances"
    classes: Mapping[str, str] = field(default_factory=dict)
    share: float = 1.0
    propagation: Propagation = "randomwalk"
    exhaustive: bool = True  # points: every nucleus near the points is clicked (public sets; not a user's clicks)

    @staticmethod
    def from_dict(d: Mapping[str, Any], types: Sequence[str]) -> DatasetSpec:
        known = {"name", "labels", "classes", "share", "propagation"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown keys in a datasets entry: {unknown} (known: {', '.join(sorted(known))})")
        name = str(d.get("name", ""))
        if name not in DATASET_NAMES:
            raise ConfigError(f"datasets entry name must be one of {', '.join(DATASET_NAMES)}, got {name!r}")
        labels = str(d.get("labels", "points" if name == "crchisto" else "instances"))
        if labels not in LABEL_KINDS:
            raise ConfigError(f"datasets entry {name}: labels must be one of {', '.join(LABEL_KINDS)}, got {labels!r}")
        if name == "crchisto" and labels != "points":
            raise ConfigError("datasets entry crchisto: CRCHisto has points only (labels: points)")
        prop = str(d.get("propagation", "randomwalk"))
        if prop not in PROPAGATIONS:
            raise ConfigError(f"datasets entry {name}: propagation must be one of {', '.join(PROPAGATIONS)}")
        classes = d.get("classes", {}) or {}
        if not isinstance(classes, Mapping):
            raise ConfigError(f"datasets entry {name}: classes must map dataset class names to types")
        own = DATASET_CLASSES[name]
        unknown_keys = sorted(str(k) for k in classes if k not in own)
        if unknown_keys:
            has = f"its classes are {', '.join(own)}" if own else "it has no classes"
            raise ConfigError(f"datasets entry {name}: classes {unknown_keys} are not {name} classes ({has})")
        bad = sorted(str(v) for v in classes.values() if v not in types)
        if bad:
            raise ConfigError(f"datasets entry {name}: classes map to {bad}, which are not in types {list(types)}")
        try:
            share = float(d.get("share", 1.0))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"datasets entry {name}: share must be a number") from exc
        if not share > 0:
            raise ConfigError(f"datasets entry {name}: share must be > 0")
        return DatasetSpec(
            name=name,
            labels=cast(LabelKind, labels),
            classes={str(k): str(v) for k, v in classes.items()},
            share=share,
            propagation=cast(Propagation, prop),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "labels": self.labels,
            "classes": dict(self.classes),
            "share": self.share,
            "propagation": self.propagation,
        }

    def class_mask(self, types: Sequence[str]) -> np.ndarray:
        """(C,) bool: the unified types this dataset annotates (its class-independent BCE mask)."""
        annotated = set(self.classes.values())
        return np.array([t in annotated for t in types], dtype=bool)

    def class_lookup(self, dataset_classes: Sequence[str], types: Sequence[str]) -> np.ndarray:
        """Lookup from the dataset's 1-based class ids (0 = no class) to unified type indices (-1: none)."""
        lut = np.full(len(dataset_classes) + 1, -1, dtype=np.int64)
        for k, name in enumerate(dataset_classes, start=1):
            if name in self.classes:
                lut[k] = list(types).index(self.classes[name])
        return lut


def relation_rows(mean_probs: Mapping[str, np.ndarray], class_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Stage-2 soft targets of one dataset: for each of its labels, the stage-1 model's mean type
    probabilities over that label's pixels, kept only for the types the dataset does *not* annotate
    (NaN elsewhere: annotated types keep their hard targets)."""
    out = {}
    for label, row in mean_probs.items():
        r = np.asarray(row, dtype=np.float64).copy()
        if r.shape != class_mask.shape:
            raise ConfigError(f"relation row for {label!r} has {r.shape[0]} types, expected {class_mask.shape[0]}")
        r[class_mask] = np.nan
        out[label] = r
    return out


def type_targets(
    inst: np.ndarray,
    instance_types: np.ndarray,
    pixel_weight: np.ndarray,
    class_mask: np.ndarray,
    relation: Mapping[str, np.ndarray] | None = None,
    relation_weight: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class targets and weights (C, H, W) float32 of one crop under the class-independent BCE.

    ``inst`` (H, W) instance ids (0 background); ``instance_types`` lookup by instance id -> unified type
    index (-1: type unknown); ``pixel_weight`` (H, W) in [0, 1] (0 ignores a pixel, e.g. uncertain
    propagated labels); ``class_mask`` (C,) the dataset's annotated types. Background: target 0 for every
    type. A typed nucleus: 1 for its type, 0 for the other annotated types, no weight for the rest. With
    ``relation`` (stage 2), types without a hard target at nucleus pixels get the relation row of the
    pixel's label (its type's name is not needed: rows are keyed by unified index as str, or
    ``GENERIC_LABEL`` for untyped nuclei) with ``relation_weight``.
    """
    c = int(class_mask.shape[0])
    h, w = inst.shape
    target = np.zeros((c, h, w), np.float32)
    weight = np.zeros((c, h, w), np.float32)
    pw = pixel_weight.astype(np.float32, copy=False)
    bg = inst == 0
    weight[:, bg] = pw[bg]
    max_id = int(inst.max()) if inst.size else 0
    lut = np.full(max_id + 1, -1, dtype=np.int64)
    n = min(len(instance_types), max_id + 1)
    lut[:n] = instance_types[:n]
    lut[0] = -1
    pix_type = lut[inst]
    for k in range(-1, c):
        sel = (~bg) & (pix_type == k)
        if not sel.any():
            continue
        if k >= 0:
            for a in np.flatnonzero(class_mask).tolist():
                target[a, sel] = 1.0 if a == k else 0.0
                weight[a, sel] = pw[sel]
        row = None if relation is None else relation.get(GENERIC_LABEL if k < 0 else str(k))
        if row is None or relation_weight <= 0:
            continue
        for j in range(c):
            if np.isfinite(row[j]) and (k < 0 or not class_mask[j]):
                target[j, sel] = float(row[j])
                weight[j, sel] = relation_weight * pw[sel]
    return target, weight
