"""Distillation into a cheaper network: the loss on known cases, and a tiny real run with the shipped teacher."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from histoseg.datasets import Sample
from histoseg.errors import ConfigError
from histoseg.models import ModelCard, NucleiNet, load_model, resolve_model
from histoseg.models.registry import card_markdown_name
from histoseg.training.augment import STRONG_PHOTOMETRIC, Augmenter
from histoseg.training.config import TrainConfig
from histoseg.training.data import TrainingData
from histoseg.training.distill import Teacher, distill_loss
from histoseg.training.ship import render_card
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


def _tiny_student(tmp_path: Path, **settings: object) -> tuple[NucleiNet, ModelCard]:
    """Train a width-8 student of the shipped default for 2 iterations of 64² crops (its distillation term is
    logged and finite); the student and its card."""
    cfg = TrainConfig(
        name="student",
        output=str(tmp_path / "run"),
        width=8,
        teacher="default",
        crop=64,
        batch_size=2,
        iterations=2,
        val_every=2,
        warmup=1,
        threads=1,
        precision="fp32",
        **settings,  # type: ignore[arg-type]
    )
    train(cfg, progress=False)
    (rec,) = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert rec["distill"] > 0 and math.isfinite(rec["distill"])
    return load_model(resolve_model(str(tmp_path / "run" / "student.safetensors")))


def test_a_cheaper_network_learns_from_the_shipped_teacher(tmp_path: Path, shared_data: Path) -> None:
    net, card = _tiny_student(tmp_path, blocks=[1, 2, 2, 2], block="bottleneck", decoder="bottleneck", heads="shared")
    assert (card.net.block, card.net.decoder, card.net.heads) == ("bottleneck", "bottleneck", "shared")
    assert card.training["config"]["teacher"] == "default"
    assert net.head is not None
    # its human-readable card states the architecture and how it was trained
    text = render_card(card)
    assert "bottleneck blocks, bottleneck decoder, shared NP/HV heads" in text
    assert "(tuned on held-out training images)" in text  # thresholds: tune, the default, even with a teacher
    assert "configs/student.yaml` (2 iterations of batch 2, distilled from the `default` model's NP/HV maps" in text
    assert card_markdown_name("default") == "MODEL_CARD.md" and card_markdown_name("lite") == "LITE_MODEL_CARD.md"


def test_unlabeled_distillation_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="distill_images must name"):
        TrainConfig.from_dict({"teacher": "default", "distill_images": ["tcga"]})
    with pytest.raises(ConfigError, match="needs a teacher"):
        TrainConfig.from_dict({"distill_images": ["crchisto"]})
    with pytest.raises(ConfigError, match="thresholds must be one of"):
        TrainConfig.from_dict({"teacher": "default", "thresholds": "median"})
    with pytest.raises(ConfigError, match="thresholds: teacher needs a teacher"):
        TrainConfig.from_dict({"thresholds": "teacher"})
    with pytest.raises(ConfigError, match="distill_crops"):
        TrainConfig.from_dict({"teacher": "default", "distill_images": ["crchisto"], "distill_crops": 0})


def _unlabeled_data(seed: int, images: list[np.ndarray], strong: bool) -> TrainingData:
    rng = np.random.default_rng(seed)
    return TrainingData(
        sources=[],
        val=[],
        rng=rng,
        augmenter=Augmenter(rng, 32),
        semantic_fraction=0.0,
        mean=(0.5, 0.5, 0.5),
        std=(0.2, 0.2, 0.2),
        max_nucleus_um=10.0,
        types=(),
        unlabeled=[Sample(name=f"u{i}", image=im, mpp=0.5) for i, im in enumerate(images)],
        strong=Augmenter(rng, 32, **STRONG_PHOTOMETRIC) if strong else None,  # type: ignore[arg-type]
    )


def test_unlabeled_crops_give_the_teacher_the_clean_crop_and_the_student_a_stain_shift() -> None:
    gen = np.random.default_rng(7)
    images = [gen.integers(40, 220, size=(48, 56, 3), dtype=np.uint8) for _ in range(3)]
    pairs = _unlabeled_data(3, images, strong=True).distill_batch(4)
    # replay the same random stream: the teacher's image is exactly the geometric crop, colours untouched
    rng = np.random.default_rng(3)
    replay = Augmenter(rng, 32)
    strong = Augmenter(rng, 32, **STRONG_PHOTOMETRIC)  # type: ignore[arg-type]
    assert len(pairs) == 4
    for student, teacher in pairs:
        crop = replay.geometric(Sample(name="x", image=images[int(rng.integers(0, 3))], mpp=0.5))
        np.testing.assert_array_equal(teacher, crop.image)
        np.testing.assert_array_equal(student, strong.photometric(crop.image))
        assert student.shape == teacher.shape == (32, 32, 3)
        assert np.abs(student.astype(int) - teacher.astype(int)).mean() > 1.0
    # without strong both see the same ordinarily augmented crop
    for student, teacher in _unlabeled_data(3, images, strong=False).distill_batch(2):
        assert student is teacher
    # no unlabeled images: nothing drawn, so existing recipes keep their random stream
    data = _unlabeled_data(5, [], strong=True)
    before = data.rng.bit_generator.state
    assert data.distill_batch(4) == [] and data.rng.bit_generator.state == before


def test_unlabeled_crops_without_a_teacher_are_refused() -> None:
    from histoseg.models.arch import NetConfig
    from histoseg.training.objective import Stage
    from histoseg.training.points import PointSupervision
    from histoseg.training.train import train_step

    card = ModelCard(name="t", net=NetConfig(width=8), mpp=0.5, mean=(0.5,) * 3, std=(0.2,) * 3)  # type: ignore[arg-type]
    net = NucleiNet(card.net)
    img = np.full((32, 32, 3), 128, np.uint8)
    opt = torch.optim.AdamW(net.parameters())
    with pytest.raises(ConfigError, match="need a teacher"):
        train_step(net, PointSupervision(0.5), opt, [], [], card, Stage(types=()), False, extra=[(img, img)])


def test_a_student_learns_from_unlabeled_crops_of_another_lab(tmp_path: Path, shared_data: Path) -> None:
    _, card = _tiny_student(
        tmp_path, distill_images=["crchisto"], distill_crops=2, distill_strong=True, thresholds="teacher"
    )
    assert card.training["config"]["distill_images"] == ["crchisto"]
    # thresholds: teacher keeps the teacher's watershed thresholds (not ones tuned on two held-out images)
    assert card.postprocess == resolve_model("default").card().postprocess
    assert card.metrics["validation_tuned"]["n_images"] == 2  # and scores them on the held-out images
    # the card names the unlabeled images and their licence terms
    assert "CRCHisto training images (70), unlabeled" in card.training["data"] and "research use" in card.license
    text = render_card(card)
    assert "2 unlabeled crops per batch of the crchisto training images (teacher on the clean crop" in text
    assert "(the teacher's, `default`)" in text and "tuned on held-out" not in text
