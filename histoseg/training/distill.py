"""Knowledge distillation: a new (cheaper) network also learns a trained teacher's NP and HV maps.

The teacher sees the same augmented crops; its nucleus probabilities are soft targets for the student's
NP head (cross-entropy against a distribution, so the student learns the teacher's uncertainty at
boundaries) and its HV maps are regression targets. This gives dense targets on every crop, also on the
semantic-only MoNuSeg images that have no instance outlines and so no HV ground truth, which is what lets
a smaller network reach the teacher's accuracy in the same short CPU schedule.

Labels tie the student to the labelled lab's images; unlabeled crops from other datasets
(``distill_images``) let it learn the teacher's answers where the teacher generalises, and with
``distill_strong`` the teacher answers on the clean crop while the student sees it under a strong stain
shift, so the student may become *more* robust to colour than its teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from histoseg.errors import ConfigError, HistosegError
from histoseg.models import ModelCard, NucleiNet
from histoseg.models.inputs import to_input


@dataclass
class Teacher:
    """A frozen trained network and the weight of its distillation term."""

    net: NucleiNet
    card: ModelCard
    weight: float

    @staticmethod
    def load(ref: str, weight: float, mpp: float, device: str) -> Teacher:
        """Load teacher ``ref`` (a model name or safetensors path); its processing mpp must be ``mpp``."""
        from histoseg.models import load_model, resolve_model

        try:
            net, card = load_model(resolve_model(ref), device)
        except HistosegError as exc:
            raise ConfigError(f"teacher {ref!r} cannot be loaded: {exc}") from exc
        if abs(card.mpp - mpp) > 1e-9:
            raise ConfigError(f"teacher {ref!r} works at {card.mpp} µm/px, the training config at {mpp}")
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        return Teacher(net, card, weight)

    def targets(self, images: list[np.ndarray], bf16: bool) -> dict[str, torch.Tensor]:
        """The teacher's NP probabilities (B, H, W) and HV maps (B, 2, H, W) on these (H, W, 3) uint8 crops,
        in float32."""
        device = next(self.net.parameters()).device
        batch = to_input(images, self.card).to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = self.net(batch.contiguous(memory_format=torch.channels_last))
        return {"np": torch.softmax(out["np"].float(), dim=1)[:, 1], "hv": out["hv"].float()}


def distill_loss(student: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
    """Soft cross-entropy of the student's NP logits against the teacher's probabilities + HV mean squared error."""
    logp = torch.log_softmax(student["np"], dim=1)
    p = target["np"]
    ce = -(p * logp[:, 1] + (1.0 - p) * logp[:, 0]).mean()
    return ce + F.mse_loss(student["hv"], target["hv"])
