"""Feature statistics of BatchNorm inputs, captured with hooks, differentiable when asked.

The source statistics (recorded at training time in the model card) and the target statistics (from the
slide being adapted) are the same quantity: per-channel mean and variance of each BN layer's input.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def bn_layers(net: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {name: m for name, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}


@contextmanager
def capture_bn_inputs(net: nn.Module) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Within the context, each forward stores ``name -> (mean, var)`` of every BN input (keeps grad)."""
    store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for name, m in bn_layers(net).items():

        def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor, name: str = name) -> None:
            x = inp[0].float()
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False)
            store[name] = (mean, var)

        hooks.append(m.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


def gaussian_kl(
    mean_t: torch.Tensor, var_t: torch.Tensor, mean_s: torch.Tensor, var_s: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """Mean over channels of KL(N(target) || N(source)) between per-channel Gaussians."""
    vt, vs = var_t + eps, var_s + eps
    kl = 0.5 * (torch.log(vs / vt) + (vt + (mean_t - mean_s) ** 2) / vs - 1.0)
    return kl.mean()
