"""Random float64 networks for tests that measure what the architecture does (receptive field, shapes)."""

from __future__ import annotations

import torch
from torch import nn

from histoseg.models import NetConfig, NucleiNet

SMALL = NetConfig(width=8)  # blocks (1, 1, 1, 1), no type head


def random_net(cfg: NetConfig, seed: int = 0, dtype: torch.dtype = torch.float64) -> NucleiNet:
    """A network in eval mode whose every weight, bias and BatchNorm buffer is random.

    Convolutions get He-normal weights so that a signal keeps its magnitude through the ~25 layers
    (the default init shrinks it by orders of magnitude, which would make far-away influence hard to
    tell from rounding). BatchNorm statistics are random so that a lost buffer changes the outputs.
    """
    torch.manual_seed(seed)
    net = NucleiNet(cfg).to(dtype)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    m.bias.uniform_(-0.1, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return net.eval()
