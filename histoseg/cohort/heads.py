"""The mode head, the two discriminators, and the generator / discriminator steps of adversarial adaptation.

- :class:`ModeHead`: reads the segmenter's stride-2 decoder features (a forward hook on ``NucleiNet.dec2``,
  the network itself is not changed), pools them over each ``patch``-px patch and predicts the patch's
  source mode (K logits): the discriminative patch representation of Tsai et al. (ICCV 2019).
- :class:`PatchDiscriminator`: source-vs-target logit per patch from the K-mode softmax map.
- :class:`OutputDiscriminator`: AdaptSegNet's (Tsai et al., CVPR 2018) fully convolutional discriminator on
  the network's output space (NP softmax and HV maps), strided 4x4 convolutions with leaky ReLUs.

The generator step updates the segmenter and the mode head (segmentation loss + mode classification on
source patches + adversarial loss on target patches, the discriminators frozen); the discriminator step
updates the discriminators only (on detached representations).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from histoseg.models import NucleiNet


@contextmanager
def decoder_features(net: NucleiNet) -> Iterator[list[torch.Tensor]]:
    """Collect ``net.dec2``'s output (stride-2 decoder features) of every forward pass inside the block."""
    store: list[torch.Tensor] = []

    def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
        store.append(out)

    handle = net.dec2.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


class ModeHead(nn.Module):
    """Patch-mode classifier on stride-2 decoder features: conv-ReLU, average over each patch, 1x1 to K."""

    def __init__(self, channels: int, k: int, patch: int, hidden: int = 64) -> None:
        super().__init__()
        if patch % 2:
            raise ValueError("patch must be even (the features are at stride 2)")
        self.patch = patch
        self.conv = nn.Conv2d(channels, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, k, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, C, H/2, W/2) features -> (B, K, H/patch, W/patch) mode logits."""
        x = F.relu(self.conv(feats))
        x = F.avg_pool2d(x, self.patch // 2)
        out: torch.Tensor = self.out(x)
        return out


class PatchDiscriminator(nn.Module):
    """Source/target logit of every patch from its K-mode probabilities (3x3 context over the patch grid)."""

    def __init__(self, k: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(k, hidden, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, 1, 3, padding=1),
        )

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(probs)
        return out


class OutputDiscriminator(nn.Module):
    """AdaptSegNet's output-space discriminator: four 4x4 stride-2 convolutions, then a 1-channel map."""

    def __init__(self, channels: int = 4, hidden: int = 32) -> None:
        super().__init__()
        widths = [channels, hidden, 2 * hidden, 4 * hidden, 4 * hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Conv2d(a, b, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(widths[-1], 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, out_space: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(out_space)
        return out


def output_space(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """The network's output space as the output discriminator sees it: NP softmax and HV (B, 4, H, W)."""
    return torch.cat([torch.softmax(out["np"], dim=1), out["hv"]], dim=1)


def adversarial_loss(logits: torch.Tensor, source: bool) -> torch.Tensor:
    """BCE of discriminator logits against "source" (1) or "target" (0)."""
    target = torch.full_like(logits, 1.0 if source else 0.0)
    return F.binary_cross_entropy_with_logits(logits, target)


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def generator_step(
    opt: torch.optim.Optimizer,
    params: list[nn.Parameter],
    discriminators: Sequence[nn.Module],
    loss_fn: Callable[[], tuple[torch.Tensor, dict[str, float]]],
) -> dict[str, float]:
    """One step of the segmenter (+ mode head): the discriminators are frozen, receive no gradient and do not
    move. ``loss_fn`` computes the total generator loss (its terms for the log)."""
    for d in discriminators:
        set_requires_grad(d, False)
    try:
        opt.zero_grad(set_to_none=True)
        loss, terms = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
    finally:
        for d in discriminators:
            set_requires_grad(d, True)
    return terms


def discriminator_step(
    opt: torch.optim.Optimizer,
    pairs: Sequence[tuple[nn.Module, torch.Tensor, torch.Tensor]],
) -> dict[str, float]:
    """One step of the discriminators on detached (source, target) representations: each learns to tell the
    source's (1) from the target's (0). The segmenter cannot move: its tensors are detached here."""
    opt.zero_grad(set_to_none=True)
    losses: list[torch.Tensor] = []
    terms: dict[str, float] = {}
    for i, (d, src, tgt) in enumerate(pairs):
        loss = 0.5 * (adversarial_loss(d(src.detach()), True) + adversarial_loss(d(tgt.detach()), False))
        terms[f"d{i}"] = float(loss.detach())
        losses.append(loss)
    torch.stack(losses).sum().backward()
    opt.step()
    return terms


__all__ = [
    "ModeHead",
    "OutputDiscriminator",
    "PatchDiscriminator",
    "adversarial_loss",
    "decoder_features",
    "discriminator_step",
    "generator_step",
    "output_space",
    "set_requires_grad",
]
