"""Distances between BatchNorm-input statistics (captured by :mod:`histoseg.models.bnstats`, the one hook
shared with training) of the slide being adapted and the source statistics recorded in the model card."""

from __future__ import annotations

import torch


def gaussian_kl(
    mean_t: torch.Tensor, var_t: torch.Tensor, mean_s: torch.Tensor, var_s: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """Mean over channels of KL(N(target) || N(source)) between per-channel Gaussians."""
    vt, vs = var_t + eps, var_s + eps
    kl = 0.5 * (torch.log(vs / vt) + (vt + (mean_t - mean_s) ** 2) / vs - 1.0)
    return kl.mean()
