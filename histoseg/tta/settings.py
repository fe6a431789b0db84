"""Settings and result of per-slide adaptation: the one definition of the methods and their knobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from histoseg.errors import ConfigError

METHODS = ("none", "bn", "tent", "g2p")  # bn (AdaBN), tent: baselines of the benchmarks, not offered by --tta
PARAMS = ("all", "top", "bn")  # g2p: which layers may move


@dataclass(frozen=True)
class TTASettings:
    method: str = "g2p"
    regions: int = 4  # K tissue crops sampled from the slide
    steps: int = 10
    crop: int = 256
    lr: float = 0.002  # g2p: relative step (fraction of a layer's norm, scaled by its ratio)
    tent_lr: float = 0.001  # tent: Adam learning rate
    guided: bool = True  # g2p: per-layer steps from the gradient-to-parameter ratio (False: uniform)
    loss: str = "z"  # g2p alignment: "z" (slide-standardised, with tolerance) or "kl" (pooled Gaussian KL)
    tolerance: float = 2.0  # g2p "z": deviations within this many source-slide SDs are not penalised
    # g2p: which layers move: the "top" G2P-ratio layers only (the default: with the guard, no development image
    # loses > 0.02 PQ, benchmarks/tta_dev.py), "all" conv and BN layers, or "bn" (BatchNorm affine only). BatchNorm
    # statistics re-estimated then affine only ("bnstats") was removed: +0.002 at best over 186 images.
    params: str = "top"
    top: float = 0.25  # g2p params="top": fraction of the layers (highest ratio at the source weights) that move
    layers: str = "all"  # g2p: statistics aligned at "all" BN layers, or at the "encoder" ones only
    gate: float = 5.0  # g2p: adapt only when the encoder's initial alignment loss (shift score) exceeds this
    guard: bool = True  # keep the source unless the adapted model is plausible on the slide's crops (guard.py)
    # gate and guard rule, chosen on the development benchmark (186 images, each a slide; benchmarks/tta_dev.py
    # --gate 0, then benchmarks/tta_guard_sweep.py): no image worse than none by > 0.02 PQ and the best mean.
    # Ratios adapted / source on the slide's crops:
    count_bounds: tuple[float, float] = (0.8, 2.0)  # nuclei found (a source model that misses nuclei finds more)
    area_bounds: tuple[float, float] = (0.5, 2.0)  # their median area
    # stain contrast (guard.changed_nuclei) of the nuclei the adaptation adds (at least) and removes (at most)
    min_added_contrast: float | None = 0.4
    max_removed_contrast: float | None = None
    # mirror-view agreement (guard.view_agreement) the adapted model must gain over the source (None: not checked)
    min_view_gain: float | None = 0.015
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown adaptation method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.regions < 1 or self.steps < 0:
            raise ConfigError("--tta-regions must be >= 1 and --tta-steps >= 0")
        if (self.loss not in ("z", "kl") or self.params not in PARAMS or self.layers not in ("encoder", "all")
                or self.tolerance < 0 or self.gate < 0 or not 0 < self.top <= 1):
            raise ConfigError(f"invalid g2p settings: loss={self.loss!r}, params={self.params!r}, "
                              f"layers={self.layers!r}, tolerance={self.tolerance}, gate={self.gate}, top={self.top}")
        for lo, hi in (self.count_bounds, self.area_bounds):
            if not 0 < lo <= 1 <= hi < 1000:  # finite: the settings go into provenance.json (strict JSON)
                raise ConfigError(f"guard bounds must bracket 1: {self.count_bounds}, {self.area_bounds}")
        for v in (self.min_added_contrast, self.max_removed_contrast):
            if v is not None and not -10 <= v <= 10:
                raise ConfigError(f"guard contrasts must be finite and within [-10, 10]: {v}")
        if self.min_view_gain is not None and not -1 <= self.min_view_gain <= 1:
            raise ConfigError(f"min_view_gain must be within [-1, 1]: {self.min_view_gain}")


@dataclass
class AdaptResult:
    state: dict[str, torch.Tensor] | None  # None: source weights kept
    report: dict[str, Any] = field(default_factory=dict)
