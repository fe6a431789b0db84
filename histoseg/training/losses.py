"""Multi-task losses (HoVer-Net): NP cross-entropy + Dice, HV MSE + gradient MSE (MSGE), TP cross-entropy.

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


def tp_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over type maps (0 = background) for samples with types."""
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[valid], target[valid])


def total_loss(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the terms present; also returns each term for logging."""
    terms = {
        "np": np_loss(out["np"], batch["np"], batch["has_np"]),
        "hv": hv_loss(out["hv"], batch["hv"], batch["np"], batch["has_inst"]),
    }
    if "tp" in out and "tp" in batch:
        terms["tp"] = tp_loss(out["tp"], batch["tp"], batch["has_types"])
    loss = terms["np"] + terms["hv"] + terms.get("tp", torch.zeros(()))
    return loss, {k: float(v.detach()) for k, v in terms.items()}
