"""Multi-task losses (HoVer-Net): NP cross-entropy + Dice, HV MSE + gradient MSE (MSGE), and the type head's
class-independent BCE; NP against soft targets for crops labelled by propagated points.

Each term is averaged only over the samples that carry that label (``valid`` masks), so images with
semantic-only masks train NP and nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sobel_kernels(size: int = 5, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.arange(-(size // 2), size // 2 + 1, dtype=torch.float32, device=device)
    h = r.view(1, -1).expand(size, size)
    v = r.view(-1, 1).expand(size, size)
    denom = h * h + v * v + 1e-15
    kh = h / denom
    kv = v / denom
    return kh.view(1, 1, size, size), kv.view(1, 1, size, size)


def np_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice on the nucleus class, over valid samples. target: (B, H, W) long."""
    if not bool(valid.any()):
        return logits.sum() * 0.0
    lg, tg = logits[valid], target[valid]
    ce = F.cross_entropy(lg, tg)
    p = torch.softmax(lg, dim=1)[:, 1]
    t = (tg == 1).float()
    inter = (p * t).sum()
    dice = 1.0 - (2.0 * inter + 1.0) / (p.sum() + t.sum() + 1.0)
    return ce + dice


def hv_loss(pred: torch.Tensor, target: torch.Tensor, focus: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """MSE over all pixels + 2 x gradient MSE inside nuclei (``focus``: (B, H, W) 0/1), valid samples."""
    if not bool(valid.any()):
        return pred.sum() * 0.0
    p, t, f = pred[valid], target[valid], focus[valid].float()
    mse = F.mse_loss(p, t)
    kh, kv = _sobel_kernels(5, p.device)
    gp_h = F.conv2d(p[:, 0:1], kh, padding=2)
    gt_h = F.conv2d(t[:, 0:1], kh, padding=2)
    gp_v = F.conv2d(p[:, 1:2], kv, padding=2)
    gt_v = F.conv2d(t[:, 1:2], kv, padding=2)
    fm = f.unsqueeze(1)
    msge = (((gp_h - gt_h) ** 2 + (gp_v - gt_v) ** 2) * fm).sum() / (fm.sum() * 2 + 1e-8)
    return mse + 2.0 * msge


def np_soft_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted cross-entropy of NP logits (B, 2, H, W) against soft nucleus targets (B, H, W) in [0, 1].

    For crops labelled by propagated points: ``target`` may carry gradient (to the affinity branch of the
    random walk), ``weight`` is the propagation's per-pixel confidence (no gradient)."""
    logp = torch.log_softmax(logits, dim=1)
    ce = -(target * logp[:, 1] + (1.0 - target) * logp[:, 0])
    return (ce * weight).sum() / weight.sum().clamp_min(1.0)


def tp_bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, nucleus: torch.Tensor) -> torch.Tensor:
    """Class-independent BCE (UniSeg) of per-class type logits (B, C, H, W).

    ``weight`` (B, C, H, W) is 0 wherever a class gets no gradient (a type the crop's dataset does not
    annotate, an ignored pixel); a weight below 1 counts a pixel partly (uncertain propagated labels,
    relational soft targets). Nucleus pixels (``nucleus`` (B, H, W) bool) and background pixels are averaged
    separately, each over its supervised (weight > 0) pixel-classes, and summed, so the few nucleus pixels
    are not drowned by the background."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight
    fg = nucleus.unsqueeze(1).to(bce.dtype)
    supervised = (weight > 0).to(bce.dtype)
    n_fg, n_bg = (supervised * fg).sum(), (supervised * (1 - fg)).sum()
    return (bce * fg).sum() / n_fg.clamp_min(1.0) + (bce * (1 - fg)).sum() / n_bg.clamp_min(1.0)
