"""Source feature statistics for test-time adaptation.

For every BatchNorm layer, the per-channel mean and variance of its *input* over the training images,
accumulated exactly (sums over all pixels of all images, in float64), recorded in the model card.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from histoseg.inference.predict import to_tensor
from histoseg.models import ModelCard, NucleiNet
from histoseg.models.network import STRIDE


@torch.no_grad()
def feature_statistics(
    net: NucleiNet, card: ModelCard, images: Iterable[np.ndarray], device: str = "cpu"
) -> dict[str, dict[str, list[float]]]:
    """Per-BN-layer input mean/var over ``images`` (RGB uint8 at the card's mpp)."""
    sums: dict[str, list[torch.Tensor]] = {}
    hooks = []

    def make_hook(name: str):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = inp[0].detach().double()
            s = x.sum(dim=(0, 2, 3))
            s2 = (x * x).sum(dim=(0, 2, 3))
            n = torch.tensor(float(x.shape[0] * x.shape[2] * x.shape[3]), dtype=torch.float64)
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
        out[name] = {"mean": [round(float(v), 6) for v in mean], "var": [round(float(v), 6) for v in var]}
    return out
