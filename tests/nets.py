"""Networks for tests: random float64 ones that measure what the architecture does (receptive field, shapes), and
an untyped copy of a shipped model (every shipped model is typed)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from histoseg.models import NetConfig, NucleiNet, load_model, resolve_model, save_model
from histoseg.models.card import ModelCard
from histoseg.training.typecard import untyped_record

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


def untyped_copy(name: str, out_dir: Path) -> Path:
    """``OUT_DIR/NAME-untyped.safetensors``: the shipped model ``name`` without its type head (its trunk and NP/HV
    heads to the bit, one class "Nucleus", no type weights, the head's records and typing figures dropped; the typed
    card's radius, which covers the trunk's field), for tests of the untyped paths."""
    net, card = load_model(resolve_model(name))
    plain = NucleiNet(replace(card.net, n_types=0))
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("tp_head.")})
    defaults = ModelCard(name="", net=plain.cfg, mpp=card.mpp)  # the untyped class: the card's default
    description, _, training, metrics = untyped_record(card)  # the head's records and typing figures dropped
    card = replace(
        card,
        name=f"{name}-untyped",
        net=plain.cfg,
        class_names=defaults.class_names,
        class_colors=defaults.class_colors,
        type_weights=None,
        description=description,
        training=training,
        metrics=metrics,
    )
    return save_model(plain.eval(), card, out_dir / f"{name}-untyped.safetensors").weights
