"""BatchNorm-input statistics captured with forward hooks: the one hook shared by training and adaptation.

The source statistics (recorded at training time in the model card, ``training.stats``) and the target
statistics (from the slide being adapted, ``tta``) are the same quantity: the per-channel mean and (biased)
variance of each BN layer's input over the batch and pixels of one forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def bn_layers(net: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """The network's BatchNorm layers by qualified name, in module order."""
    return {name: m for name, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}


@contextmanager
def capture_bn_inputs(
    net: nn.Module, dtype: torch.dtype = torch.float32, detach: bool = False
) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Within the context, each forward stores ``name -> (mean, var)`` of every BN input (per channel).

    ``dtype``: arithmetic of the statistics (float64 for the recorded source statistics); ``detach``: drop
    the autograd graph (statistics only) instead of keeping it (adaptation differentiates through them).
    """
    store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for name, m in bn_layers(net).items():

        def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor, name: str = name) -> None:
            x = inp[0].detach() if detach else inp[0]
            x = x.to(dtype)
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False)
            store[name] = (mean, var)

        hooks.append(m.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()
