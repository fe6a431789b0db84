"""Stage 2 of the label-shift training: measure the class relations of every dataset on the current model.

For each dataset and each of its labels (a unified type its points carry, or ``nucleus`` for nuclei of
unknown type), the mean per-class type probability of the stage-1 model over that label's pixels:
instance/mask pixels for mask datasets, small discs around the points for point datasets. The rows
become soft targets for the types the dataset does not annotate
(:func:`histoseg.training.labels.relation_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from histoseg.datasets import Sample
from histoseg.inference import run_network
from histoseg.models import ModelCard, NucleiNet
from histoseg.training.data import TrainingSource
from histoseg.training.labels import GENERIC_LABEL, relation_rows

POINT_DISC_UM = 2.0
"""Radius of the disc around a point whose pixels stand for its nucleus when measuring relations."""
MAX_IMAGES = 12
"""Images per dataset used to measure its relations (evenly spaced over its sorted list)."""


@torch.no_grad()
def measure_relations(
    net: NucleiNet, card: ModelCard, sources: Sequence[TrainingSource], types: Sequence[str], device: str = "cpu"
) -> dict[int, dict[str, np.ndarray]]:
    """Relation rows per source index (only sources with at least one type they do not annotate)."""
    out: dict[int, dict[str, np.ndarray]] = {}
    was_training = net.training
    net.eval()
    for k, src in enumerate(sources):
        mask = src.spec.class_mask(types)
        if mask.all():
            continue
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        step = max(1, len(src.samples) // MAX_IMAGES)
        for s in list(src.samples)[::step][:MAX_IMAGES]:
            _, _, cells = run_network(net, card, s.image, device=device)
            if cells is None:
                continue
            tp = cells.full(*s.image.shape[:2])
            for label, sel in _label_pixels(s, src, card.mpp):
                if sel.any():
                    sums[label] = sums.get(label, np.zeros(len(types))) + tp[:, sel].sum(axis=1)
                    counts[label] = counts.get(label, 0) + int(sel.sum())
        means = {lab: sums[lab] / counts[lab] for lab in sums if counts[lab] > 0}
        if means:
            out[k] = relation_rows(means, mask)
    net.train(was_training)
    return out


def _label_pixels(s: Sample, src: TrainingSource, mpp: float) -> list[tuple[str, np.ndarray]]:
    """(label, pixel mask) pairs of one image of ``src``."""
    h, w = s.image.shape[:2]
    inst, semantic, points = s.inst, s.semantic, s.points
    if src.spec.labels == "instances":
        lab = inst if inst is not None else semantic
        return [] if lab is None else [(GENERIC_LABEL, np.asarray(lab) > 0)]
    if points is None or len(points) == 0:
        return []
    types = src.instance_types(s)[1:]
    r = POINT_DISC_UM / mpp
    yy, xx = np.mgrid[0:h, 0:w]
    res = []
    for t in np.unique(types):
        sel = np.zeros((h, w), bool)
        for x, y in np.asarray(points)[types == t]:
            x0, x1 = max(0, int(x - r)), min(w, int(x + r) + 2)
            y0, y1 = max(0, int(y - r)), min(h, int(y + r) + 2)
            sel[y0:y1, x0:x1] |= (xx[y0:y1, x0:x1] - x) ** 2 + (yy[y0:y1, x0:x1] - y) ** 2 <= r * r
        res.append((GENERIC_LABEL if t < 0 else str(int(t)), sel))
    return res
