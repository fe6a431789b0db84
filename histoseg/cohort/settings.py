"""Settings of ``histoseg adapt-cohort`` (no torch import: the command line reads the defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from histoseg.config import check_device
from histoseg.errors import ConfigError

FEATURE_SETS = ("fraction", "size", "size+density")
"""Patch features (:mod:`histoseg.cohort.modes`): ``fraction``: background / nucleus pixels; ``size``:
background and three nucleus-size bins; ``size+density``: the size histogram plus the nucleus density."""

METHODS = ("patch", "output", "patch+output")
"""``patch``: discriminative patch representations (Tsai, Sohn, Schulter, Chandraker, ICCV 2019);
``output``: output-space alignment (AdaptSegNet, Tsai et al., CVPR 2018); ``patch+output``: both."""


@dataclass(frozen=True)
class CohortSettings:
    """Knobs of ``histoseg adapt-cohort``. K = 5 modes of 64-px (32 µm) patches on size + density
    histograms: the measured choice (``python -m benchmarks.cohort --sections k``)."""

    method: str = "patch"
    steps: int = 300
    batch_size: int = 4  # crops per domain and step
    crop: int = 256
    patch: int = 64  # patch side (model px) of the mode grid
    modes: int = 5  # K
    features: str = "size+density"
    lr: float = 2.5e-4  # segmenter and mode head (SGD, momentum 0.9, as AdaptSegNet; warm-up then cosine)
    head_lr: float = 2.5e-3  # mode head
    head_warmup: int = 200  # steps that teach the fresh mode head the source modes first (segmenter frozen, Adam)
    disc_lr: float = 1e-4  # discriminators (Adam, betas 0.9/0.99 as AdaptSegNet)
    mode_weight: float = 0.1
    adv_weight: float = 0.05  # patch-representation adversarial loss
    output_weight: float = 0.01  # output-space adversarial loss
    # feature-statistics alignment of the target crops to the card's source statistics (per-slide g2p's loss); the
    # weight measured on DSB (benchmarks/cohort.py): 0.01 keeps MoNuSeg-test PQ within 0.005 of the source model,
    # 0.02 costs 0.010 and 0.1 costs 0.036 there (for +0.054, +0.074 and +0.090 DSB PQ)
    align_weight: float = 0.01
    ramp: float = 0.2  # fraction of the steps over which the adversarial weights rise from 0
    crops_per_slide: int = 8
    checkpoint_every: int = 50
    seed: int = 0
    threads: int = 1
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown cohort method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.features not in FEATURE_SETS:
            raise ConfigError(f"unknown patch features {self.features!r}; choose from {', '.join(FEATURE_SETS)}")
        ints = {"steps": self.steps, "batch_size": self.batch_size, "modes": self.modes,
                "crops_per_slide": self.crops_per_slide, "checkpoint_every": self.checkpoint_every,
                "threads": self.threads}  # fmt: skip
        bad = [f"{k}={v}" for k, v in ints.items() if v < 1]
        if self.head_warmup < 0:
            bad.append(f"head_warmup={self.head_warmup}")
        if self.modes < 2:
            bad.append(f"modes={self.modes} (at least 2)")
        if self.crop < 64 or self.crop % 32 or self.patch < 8 or self.patch % 8 or self.crop % self.patch:
            bad.append(f"crop={self.crop}, patch={self.patch} (crop a multiple of 32 and of patch, >= 64)")
        for name in ("lr", "head_lr", "disc_lr", "mode_weight", "adv_weight", "output_weight", "align_weight"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                bad.append(f"{name}={v}")
        if not 0 <= self.ramp <= 1:
            bad.append(f"ramp={self.ramp}")
        if bad:
            raise ConfigError("invalid cohort settings: " + ", ".join(bad))
        check_device(self.device, here=True)  # checked before minutes of crop sampling

    @property
    def uses_patch(self) -> bool:
        return "patch" in self.method

    @property
    def uses_output(self) -> bool:
        return "output" in self.method


__all__ = ["FEATURE_SETS", "METHODS", "CohortSettings"]
