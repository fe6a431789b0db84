"""Distillation into a cheaper network: the loss on known cases, and a tiny real run with the shipped teacher."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from histoseg.errors import ConfigError
from histoseg.models import load_model, resolve_model
from histoseg.training.config import TrainConfig
from histoseg.training.distill import Teacher, distill_loss
from histoseg.training.ship import card_markdown_name, render_card
from histoseg.training.train import train


def test_distill_loss_known_values() -> None:
    """Teacher p = 0.5 everywhere: a student with zero logits pays ln 2 (the entropy) and no HV error."""
    hv = torch.rand(2, 2, 8, 8) * 2 - 1
    target = {"np": torch.full((2, 8, 8), 0.5), "hv": hv}
    same = {"np": torch.zeros(2, 2, 8, 8), "hv": hv.clone()}
    assert float(distill_loss(same, target)) == pytest.approx(math.log(2.0), abs=1e-6)
    # a confident student (p = sigmoid(4) for "nucleus") pays more, and a wrong HV map adds its mean squared error
    sure = {"np": torch.stack([torch.zeros(2, 8, 8), torch.full((2, 8, 8), 4.0)], 1), "hv": hv + 0.5}
    p = 1 / (1 + math.exp(-4.0))
    expected = -(0.5 * math.log(p) + 0.5 * math.log(1 - p)) + 0.25
    assert float(distill_loss(sure, target)) == pytest.approx(expected, rel=1e-5)


def test_teacher_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="no-such-model"):
        Teacher.load("no-such-model", 1.0, 0.5, "cpu")
    with pytest.raises(ConfigError, match="µm/px"):
        Teacher.load("default", 1.0, 0.25, "cpu")
    with pytest.raises(ConfigError, match="heads"):
        TrainConfig.from_dict({"heads": "three"})
    with pytest.raises(ConfigError, match="distill_weight"):
        TrainConfig.from_dict({"teacher": "default", "distill_weight": -1})


def test_a_cheaper_network_learns_from_the_shipped_teacher(tmp_path: Path, shared_data: Path) -> None:
    cfg = TrainConfig(
        name="student",
        output=str(tmp_path / "run"),
        width=8,
        blocks=[1, 2, 2, 2],
        block="bottleneck",
        decoder="bottleneck",
        heads="shared",
        teacher="default",
        crop=64,
        batch_size=2,
        iterations=2,
        val_every=2,
        warmup=1,
        threads=1,
        precision="fp32",
    )
    train(cfg, progress=False)
    (rec,) = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert rec["distill"] > 0 and math.isfinite(rec["distill"])
    net, card = load_model(resolve_model(str(tmp_path / "run" / "student.safetensors")))
    assert (card.net.block, card.net.decoder, card.net.heads) == ("bottleneck", "bottleneck", "shared")
    assert card.training["config"]["teacher"] == "default"
    assert net.head is not None
    # its human-readable card states the architecture and how it was trained
    text = render_card(card)
    assert "bottleneck blocks, bottleneck decoder, shared NP/HV heads" in text
    assert "configs/student.yaml` (2 iterations of batch 2, distilled from the `default` model's NP/HV maps" in text
    assert card_markdown_name("default") == "MODEL_CARD.md" and card_markdown_name("lite") == "LITE_MODEL_CARD.md"
