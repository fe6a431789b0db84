"""G2P: gradient-to-parameter-ratio guided feature alignment, the project's per-slide adaptation method
(see :mod:`histoseg.tta.methods` for the method's description and the interface it shares)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from histoseg.errors import ModelError
from histoseg.models import ModelCard, NucleiNet
from histoseg.models.bnstats import capture_bn_inputs
from histoseg.tta import guard
from histoseg.tta.bnops import affine_params
from histoseg.tta.settings import TTASettings
from histoseg.tta.stats import gaussian_kl

ENCODER_PREFIXES = ("stem", "stages")  # NucleiNet's encoder: where stain and scanner shifts show first
_FLOOR_LOGSD = 0.05  # floors on the source spreads, so a channel that never varied cannot dominate


def has_slide_statistics(source: dict[str, dict[str, list[float]]]) -> bool:
    """Whether a card's source statistics include the per-slide spreads that the ``z`` loss needs."""
    return bool(source) and all("slide_mean_sd" in v for v in source.values())


class AlignmentLoss:
    """Distance between a slide's BN-input statistics and the source's, summed over layers.

    ``z`` (default): per channel, the slide's mean and log-variance are standardised by the spread of those
    figures over the *source slides* (``slide_*`` entries in the card); deviations within ``tolerance``
    standard deviations are free, larger ones cost their square. A source slide therefore costs nothing, and
    channels whose statistics vary with tissue content weigh less than the ones a stain shift moves.
    ``kl``: mean over channels of KL(N(slide) || N(source pooled)), the plain form (for the ablation).
    """

    def __init__(
        self,
        source: dict[str, dict[str, list[float]]],
        kind: str,
        tolerance: float,
        layers: str = "all",
        device: str | torch.device = "cpu",
    ) -> None:
        if kind == "z" and not has_slide_statistics(source):
            raise ModelError("the model card has no per-slide source statistics (re-run training's finalize); "
                             "use the 'kl' alignment loss with this model")
        self.kind, self.tolerance, self.layers = kind, tolerance, layers
        self.src = {  # on the network's device: the cohort training may run on a GPU
            k: {f: torch.tensor(v, dtype=torch.float32, device=device) for f, v in s.items()} for k, s in source.items()
        }

    def layer(self, name: str, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor | None:
        s = self.src.get(name)
        if s is None:
            return None
        if self.kind == "kl":
            return gaussian_kl(mean, var, s["mean"], s["var"])
        floor_m = 0.05 * s["var"].sqrt() + 1e-3
        zm = (mean - s["slide_mean"]) / (s["slide_mean_sd"] + floor_m)
        zl = (torch.log(var + 1e-5) - s["slide_logvar"]) / (s["slide_logvar_sd"] + _FLOOR_LOGSD)
        excess = torch.relu(zm.abs() - self.tolerance) ** 2 + torch.relu(zl.abs() - self.tolerance) ** 2
        return 0.5 * excess.mean()

    def __call__(self, net: NucleiNet, x: torch.Tensor) -> tuple[torch.Tensor, float, dict[str, torch.Tensor]]:
        """(alignment loss over the chosen layers, shift score over the encoder layers, network outputs)."""
        with capture_bn_inputs(net) as st:
            out = net(x)
        total, shift = self.of_statistics(st, x.new_zeros(()))
        return total, shift, out

    def of_statistics(
        self, st: dict[str, tuple[torch.Tensor, torch.Tensor]], zero: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """(alignment loss over the chosen layers, shift score over the encoder layers) of captured BN-input
        statistics (``models.bnstats.capture_bn_inputs``); ``zero``: a scalar on the statistics' device."""
        total, shift = zero, 0.0
        for name, (mu, var) in st.items():
            term = self.layer(name, mu, var)
            if term is None:
                continue
            encoder = name.startswith(ENCODER_PREFIXES)
            if self.layers == "all" or encoder:
                total = total + term
            if encoder:
                shift += float(term.detach())
        return total, shift


def _param_groups(net: nn.Module, which: str, card: ModelCard) -> dict[str, list[nn.Parameter]]:
    """Layers as parameter groups: BN affine pairs, or every conv and BN module's parameters.

    A type head without source statistics of its own (one trained on a frozen trunk,
    :mod:`histoseg.training.typehead`) is left out: no alignment term reaches it, and counting its layers would
    change which trunk layers move and by how much, so the typed model's trunk adapts exactly as the untyped
    model it was built on."""
    skip = "tp_head." if not any(k.startswith("tp_head.") for k in card.source_stats) else None
    if which == "bn":
        groups = affine_params(net)
    else:
        groups = {}
        for name, m in net.named_modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                ps = [p for p in m.parameters(recurse=False)]
                if ps:
                    groups[name] = ps
    return {k: v for k, v in groups.items() if skip is None or not k.startswith(skip)}


def _norm(ts: Sequence[torch.Tensor | None]) -> float:
    return math.sqrt(sum(float((t.detach() ** 2).sum()) for t in ts if t is not None))


def _top_groups(
    groups: dict[str, list[nn.Parameter]], r: dict[str, float], fraction: float
) -> dict[str, list[nn.Parameter]]:
    """The layers with the highest gradient-to-parameter ratios (at least one); the others are frozen."""
    n = max(1, math.ceil(fraction * len(groups)))
    keep = set(sorted(groups, key=lambda k: (-r[k], k))[:n])
    for name, ps in groups.items():
        if name not in keep:
            for p in ps:
                p.requires_grad_(False)
                p.grad = None
    return {k: v for k, v in groups.items() if k in keep}


def g2p(net: NucleiNet, x: torch.Tensor, card: ModelCard, s: TTASettings) -> dict[str, Any]:
    """Steps along the alignment gradient, each layer moved by ``lr x r_l / mean(r)`` of its own norm.

    The iterate with the lowest alignment loss is kept (the loss is evaluated at every iterate anyway); a
    slide already within the tolerance costs one forward pass and keeps the source weights.
    """
    loss_fn = AlignmentLoss(card.source_stats, s.loss, s.tolerance, s.layers)
    groups = _param_groups(net, s.params, card)
    for p in net.parameters():
        p.requires_grad_(False)
    for ps in groups.values():
        for p in ps:
            p.requires_grad_(True)
    params = [p for ps in groups.values() for p in ps]
    best: tuple[float, int, list[torch.Tensor] | None] = (math.inf, 0, None)
    before = shift0 = math.nan
    heads0: dict[str, float] = {}
    heads_best: dict[str, float] = {}
    gated = False
    ratios: dict[str, float] = {}
    history: list[float | None] = []
    for it in range(s.steps + 1):
        last = it == s.steps
        with torch.set_grad_enabled(not last):
            loss, shift, out = loss_fn(net, x)
        value = float(loss.detach())
        history.append(round(value, 6) if math.isfinite(value) else None)
        if not math.isfinite(value):
            break  # diverged: the best iterate so far (or the source) is kept
        if it == 0:
            before, heads0, shift0 = value, guard.heads(out), shift
            if shift <= s.gate or value <= 1e-9:
                gated = True
                break  # no shift detected: the slide is within the source slides' range
        if value < best[0]:
            best = (value, it, None if it == 0 else [p.detach().clone() for p in params])
            heads_best = guard.heads(out)
        if last:
            break
        for p in params:
            p.grad = None
        loss.backward()
        norms = {name: (_norm([p.grad for p in ps]) + 1e-12, _norm(ps)) for name, ps in groups.items()}
        r = {name: g / (t + 1e-12) for name, (g, t) in norms.items()}
        if not ratios:
            ratios = r  # at the source weights
            if s.params == "top":
                groups = _top_groups(groups, r, s.top)
        mean_r = sum(r.values()) / max(1, len(r)) + 1e-12
        with torch.no_grad():
            for name, ps in groups.items():
                scale = (r[name] / mean_r) if s.guided else 1.0
                gnorm, tnorm = norms[name]
                # move the layer by (lr x scale) of its own norm, along the negative gradient
                step = s.lr * scale * tnorm / gnorm
                for p in ps:
                    if p.grad is not None:
                        p.sub_(step * p.grad)
    after, best_it, best_params = best
    kept, reason = False, ""
    if best_params is None:
        kept = True
        reason = "no shift detected (loss within the gate)" if gated else "alignment loss did not fall"
    else:
        reason = guard.collapsed(heads0, heads_best)
        kept = bool(reason)
    with torch.no_grad():
        if best_params is not None and not kept:
            for p, v in zip(params, best_params, strict=True):
                p.copy_(v)
    for p in net.parameters():
        p.requires_grad_(False)
    ranked = sorted(ratios.items(), key=lambda kv: -kv[1])
    return {
        "loss": loss_fn.kind,
        "tolerance": s.tolerance if s.loss == "z" else None,
        "params": s.params,
        "shift_score": shift0,
        "gate": s.gate,
        "loss_before": before,
        "loss_after": after if not kept else before,
        "loss_history": history,
        "best_step": best_it,
        "heads_before": heads0,
        "heads_after": heads_best if not kept else heads0,
        "guided": s.guided,
        "g2p_ratios": {k: round(v, 6) for k, v in ranked},
        "moved_layers": sorted(groups),
        "kept_source": kept,
        "guard": reason,
    }
