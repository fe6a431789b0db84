"""Source feature statistics for test-time adaptation.

For every BatchNorm layer, the per-channel statistics of its *input* over the training images:

- ``mean``/``var``: pooled over all pixels of all images (float64 sums), the classic source statistics;
- ``slide_mean``/``slide_mean_sd``: the mean and spread over images of each image's own channel mean;
- ``slide_logvar``/``slide_logvar_sd``: the same for each image's log-variance.

The per-image figures describe what one *slide* of the source domain looks like: a slide's statistics
differ from the pooled ones even without any shift (its tissue content differs), and the spread says by how
much. Test-time alignment (``histoseg.tta``) measures a slide's distance to the source in those units, so
that natural content variation is not mistaken for a stain or scanner shift.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from histoseg.models import ModelCard, NucleiNet
from histoseg.models.bnstats import capture_bn_inputs
from histoseg.models.inputs import pad_to_stride, to_input

_EPS = 1e-5


def _r(t: torch.Tensor) -> list[float]:
    return [round(float(v), 6) for v in t]


@torch.no_grad()
def feature_statistics(
    net: NucleiNet, card: ModelCard, images: Iterable[np.ndarray], device: str = "cpu"
) -> dict[str, dict[str, list[float]]]:
    """Per-BN-layer input statistics over ``images`` (RGB uint8 at the card's mpp): pooled and per image.

    Images are padded and normalised exactly as inference feeds them (``models.inputs``) and the statistics
    come from the same hook adaptation uses (``models.bnstats``), in float64."""
    per_image: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    was_training = net.training
    net.eval()
    try:
        with capture_bn_inputs(net, dtype=torch.float64, detach=True) as store:
            for img in images:
                padded = pad_to_stride(img)
                net(to_input(padded, card).to(device))
                # every BN input's pixel count is proportional to the input's: the pooled statistics' weight
                n = float(padded.shape[0] * padded.shape[1])
                for name, (mean, var) in store.items():
                    per_image.setdefault(name, []).append((mean.cpu(), var.cpu(), n))
    finally:
        net.train(was_training)
    out: dict[str, dict[str, list[float]]] = {}
    for name, rows in per_image.items():
        means = torch.stack([m for m, _, _ in rows])
        variances = torch.stack([v for _, v, _ in rows])
        weights = torch.tensor([n for _, _, n in rows], dtype=torch.float64).view(-1, 1)
        total = weights.sum()
        mean = (weights * means).sum(0) / total
        var = ((weights * (variances + means * means)).sum(0) / total - mean * mean).clamp_min(0)
        logvars = torch.log(variances + _EPS)
        out[name] = {
            "mean": _r(mean),
            "var": _r(var),
            "slide_mean": _r(means.mean(0)),
            "slide_mean_sd": _r(means.std(0, unbiased=True) if len(means) > 1 else torch.zeros_like(mean)),
            "slide_logvar": _r(logvars.mean(0)),
            "slide_logvar_sd": _r(logvars.std(0, unbiased=True) if len(logvars) > 1 else torch.zeros_like(mean)),
        }
    return out
