"""Training configuration: a documented YAML file mapped onto a dataclass (unknown keys are errors)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from histoseg.config import PRECISION_CHOICES, check_device
from histoseg.errors import ConfigError
from histoseg.models.arch import NetConfig

THRESHOLD_CHOICES = ("tune", "teacher")
"""Where a trained model's watershed thresholds come from (``TrainConfig.thresholds``)."""


def read_config(path: str | Path) -> dict[str, Any]:
    """A training YAML file's mapping (ConfigError when it is missing, not YAML, or not a mapping)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"training config not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"training config {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"training config {path} must be a mapping of keys to values")
    return data


@dataclass
class TrainConfig:
    """Every knob of ``histoseg train``; see ``configs/default.yaml`` for a commented example."""

    name: str = "default"
    output: str = "runs/default"  # checkpoints, logs and the final artifact go here
    seed: int = 0
    mpp: float = 0.5  # processing resolution of the model (µm/px)
    width: int = 32  # network width (channels of the first encoder stage)
    blocks: list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    block: str = "basic"  # encoder residual block: basic | bottleneck (histoseg.models.network.BLOCK_CHOICES)
    decoder: str = "plain"  # decoder fusion: plain | bottleneck (DECODER_CHOICES)
    heads: str = "separate"  # NP/HV branches: separate | shared (HEADS_CHOICES)
    crop: int = 256  # training crop side at `mpp`
    batch_size: int = 8
    iterations: int = 3000
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    val_every: int = 250
    val_images: list[str] = field(default_factory=list)  # MoNuSeg training images held out for validation
    semantic_fraction: float = 0.3  # share of batch items drawn from semantic-only images
    threads: int = 2
    device: str = "cpu"
    precision: str = "auto"  # auto: bf16 autocast where native (~5-10x faster steps there), else fp32; bf16 | fp32
    init: str | None = None  # optional safetensors to start from (same architecture; a type head may be new)
    # the datasets and the labels each carries (histoseg.training.labels.DatasetSpec): name monuseg|crchisto,
    # labels instances|points, classes {dataset class: type}, share (of each batch), propagation randomwalk|voronoi
    datasets: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "monuseg", "labels": "instances"}])
    types: list[str] = field(default_factory=list)  # unified nucleus types of the type head; empty: untyped model
    type_weight: float = 1.0  # weight of the type head's class-independent BCE
    relation_from: int = 0  # iteration at which stage 2 (class-relational soft targets) starts; 0: never
    relation_weight: float = 0.1  # weight of the relational soft targets (stage 2)
    affinity_lr: float = 1e-3  # learning rate of the random walk's affinity branch
    point_target: str = "hard"  # NP target of point crops: hard (pseudo-instances) | soft (walk probability)
    affinity_from: int | None = None  # hard targets: iteration at which the affinity starts learning (None: half)
    teacher: str | None = None  # model (name or safetensors) whose NP/HV maps the network also learns (distillation)
    distill_weight: float = 1.0  # weight of the distillation term when a teacher is given
    # datasets (monuseg | crchisto) whose training *images* add unlabeled crops learnt from the teacher alone:
    # the student then sees the teacher's behaviour on other labs' colours and tissues, not only on its labels
    distill_images: list[str] = field(default_factory=list)
    distill_crops: int = 4  # unlabeled crops added to each batch when distill_images is set
    # unlabeled crops: the teacher sees the crop before its colour augmentation and the student after a
    # stronger one (consistency distillation: the student learns the teacher's clean answer under stain shift)
    distill_strong: bool = False
    # watershed thresholds of the artifact: tune (grid on the held-out images) | teacher (the teacher's: a distilled
    # model learnt its probabilities, and two held-out images are few to tune on; see train.finalize)
    thresholds: str = "tune"

    @staticmethod
    def load(path: str | Path) -> TrainConfig:
        return TrainConfig.from_dict(read_config(path))

    @staticmethod
    def from_dict(data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training config keys: {unknown}")
        cfg = TrainConfig(**data)
        if cfg.precision not in PRECISION_CHOICES:
            raise ConfigError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {cfg.precision!r}")
        check_device(cfg.device, option="device")
        if cfg.crop % 32 or cfg.crop < 64:
            raise ConfigError("crop must be a multiple of 32 and >= 64")
        if not isinstance(cfg.datasets, list) or not cfg.datasets or not all(isinstance(d, dict) for d in cfg.datasets):
            raise ConfigError("datasets must be a non-empty list of entries (name, labels, classes, share)")
        from histoseg.training.objective import POINT_TARGETS

        if cfg.point_target not in POINT_TARGETS:
            raise ConfigError(f"point_target must be one of {', '.join(POINT_TARGETS)}, got {cfg.point_target!r}")
        if len(set(cfg.types)) != len(cfg.types) or not all(isinstance(t, str) and t for t in cfg.types):
            raise ConfigError("types must be a list of distinct, non-empty names")
        if cfg.distill_weight < 0:
            raise ConfigError(f"distill_weight must be >= 0, got {cfg.distill_weight}")
        if cfg.thresholds not in THRESHOLD_CHOICES:
            raise ConfigError(f"thresholds must be one of {', '.join(THRESHOLD_CHOICES)}, got {cfg.thresholds!r}")
        if cfg.thresholds == "teacher" and not cfg.teacher:
            raise ConfigError("thresholds: teacher needs a teacher")
        if cfg.distill_images:
            from histoseg.training.labels import DATASET_NAMES

            bad = sorted(set(cfg.distill_images) - set(DATASET_NAMES))
            if bad:
                raise ConfigError(f"distill_images must name datasets among {', '.join(DATASET_NAMES)}, got {bad}")
            if not cfg.teacher:
                raise ConfigError("distill_images needs a teacher: unlabeled crops learn from its maps alone")
            if cfg.distill_crops < 1:
                raise ConfigError(f"distill_crops must be >= 1, got {cfg.distill_crops}")
        cfg.net_config(0)  # the architecture is checked before hours of training
        from histoseg.training.labels import DatasetSpec

        for d in cfg.datasets:
            DatasetSpec.from_dict(d, cfg.types)  # every entry checked before hours of training
        return cfg

    def net_config(self, n_types: int) -> NetConfig:
        """The architecture these settings describe (ConfigError when it cannot be built)."""
        try:
            return NetConfig(
                width=self.width,
                blocks=tuple(self.blocks),  # type: ignore[arg-type]
                n_types=n_types,
                block=self.block,
                decoder=self.decoder,
                heads=self.heads,
            )
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"training config: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
