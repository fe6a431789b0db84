"""BatchNorm operations shared by the adaptation methods: AdaBN re-estimation and the affine parameters."""

from __future__ import annotations

import torch
from torch import nn

from histoseg.models.bnstats import bn_layers


def affine_params(net: nn.Module) -> dict[str, list[nn.Parameter]]:
    out = {}
    for name, m in bn_layers(net).items():
        if m.weight is not None and m.bias is not None:
            out[name] = [m.weight, m.bias]
    return out


@torch.no_grad()
def adabn(net: nn.Module, x: torch.Tensor) -> None:
    """Running statistics := statistics of the slide's crops (cumulative average over one pass)."""
    for m in bn_layers(net).values():
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for i in range(0, x.shape[0], 4):
        net(x[i : i + 4])
    for m in bn_layers(net).values():
        m.momentum = 0.1
    net.eval()
