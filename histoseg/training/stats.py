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
from torch import nn

from histoseg.inference.predict import to_tensor
from histoseg.models import ModelCard, NucleiNet
from histoseg.models.network import STRIDE

_EPS = 1e-5


def _r(t: torch.Tensor) -> list[float]:
    return [round(float(v), 6) for v in t]


@torch.no_grad()
def feature_statistics(
    net: NucleiNet, card: ModelCard, images: Iterable[np.ndarray], device: str = "cpu"
) -> dict[str, dict[str, list[float]]]:
    """Per-BN-layer input statistics over ``images`` (RGB uint8 at the card's mpp): pooled and per image."""
    sums: dict[str, list[torch.Tensor]] = {}
    per_image: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    hooks = []

    def make_hook(name: str):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = inp[0].detach().double()
            s = x.sum(dim=(0, 2, 3))
            s2 = (x * x).sum(dim=(0, 2, 3))
            n = torch.tensor(float(x.shape[0] * x.shape[2] * x.shape[3]), dtype=torch.float64)
            per_image.setdefault(name, []).append((s / n, (s2 / n - (s / n) ** 2).clamp_min(0)))
            if name in sums:
                sums[name][0] += s
                sums[name][1] += s2
                sums[name][2] += n
            else:
                sums[name] = [s, s2, n]

        return hook

    for name, m in net.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_hook(make_hook(name)))
    was_training = net.training
    net.eval()
    try:
        for img in images:
            h, w = img.shape[:2]
            ph, pw = (-h) % STRIDE, (-w) % STRIDE
            if ph or pw:
                img = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="reflect")
            net(to_tensor(img, card).to(device))
    finally:
        for hk in hooks:
            hk.remove()
        net.train(was_training)
    out: dict[str, dict[str, list[float]]] = {}
    for name, (s, s2, n) in sums.items():
        mean = s / n
        var = (s2 / n - mean * mean).clamp_min(0)
        means = torch.stack([m for m, _ in per_image[name]])
        logvars = torch.log(torch.stack([v for _, v in per_image[name]]) + _EPS)
        out[name] = {
            "mean": _r(mean),
            "var": _r(var),
            "slide_mean": _r(means.mean(0)),
            "slide_mean_sd": _r(means.std(0, unbiased=True) if len(means) > 1 else torch.zeros_like(mean)),
            "slide_logvar": _r(logvars.mean(0)),
            "slide_logvar_sd": _r(logvars.std(0, unbiased=True) if len(logvars) > 1 else torch.zeros_like(mean)),
        }
    return out
