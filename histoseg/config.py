"""Settings: one frozen dataclass per job, and where the shared data lives.

The shared data folder is found through one setting, ``HISTOSEG_DATA``; without it, ``../shared/data``
beside the repository checkout (development installs) or beside the working directory.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from histoseg.errors import ConfigError

ALL_FORMATS = ("geojson", "zarr", "parquet")


def data_dir() -> Path:
    """Folder of the shared slides and nuclei datasets (may not exist; callers check)."""
    env = os.environ.get("HISTOSEG_DATA")
    if env:
        return Path(env)
    repo_guess = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    if repo_guess.is_dir():
        return repo_guess
    return Path.cwd().parent / "shared" / "data"


TTA_CHOICES = ("auto", "none", "bn", "tent", "g2p")


@dataclass(frozen=True)
class SegmentConfig:
    """Everything that changes the outputs of ``segment`` (recorded in provenance.json)."""

    model: str = "default"
    slide_mpp: float | None = None
    region_size: int = 1024  # core size in processing pixels; also the Zarr chunk size
    workers: int = 1
    formats: tuple[str, ...] = ALL_FORMATS
    geojson_gzip: bool = False
    overwrite: bool = False
    device: str = "cpu"
    backend: str = "auto"  # auto | tiffslide | openslide | image | omezarr
    strict_halo: bool = False
    tissue_threshold: float | None = None  # None: Otsu on saturation
    min_tissue_fraction: float = 0.01  # of a region's core area
    np_threshold: float | None = None  # None: the model card's tuned value
    min_nucleus_area_um2: float = 3.0
    precision: str = "bf16"  # network arithmetic: bf16 autocast (default: ~2x faster on CPU, same MoNuSeg PQ) | fp32
    tta: str = "auto"  # per-slide adaptation: auto (g2p where the model supports it) | none | bn | tent | g2p
    tta_regions: int = 4  # K tissue crops sampled for adaptation (the shift benchmark's K)
    tta_steps: int = 10
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [f for f in self.formats if f not in ALL_FORMATS]
        if bad:
            raise ConfigError(f"unknown output format(s) {bad}; choose from {', '.join(ALL_FORMATS)}")
        if self.region_size < 64 or self.region_size % 32:
            raise ConfigError(f"--region-size must be a multiple of 32 and >= 64, got {self.region_size}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.slide_mpp is not None and not (0.01 <= self.slide_mpp <= 100):
            raise ConfigError(f"--slide-mpp must be between 0.01 and 100 µm/px, got {self.slide_mpp}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"--precision must be bf16 or fp32, got {self.precision!r}")
        if self.tta not in TTA_CHOICES:
            raise ConfigError(f"--tta must be one of {', '.join(TTA_CHOICES)}; got {self.tta!r}")
        if self.tta_regions < 1 or self.tta_steps < 0:
            raise ConfigError("--tta-regions must be >= 1 and --tta-steps >= 0")
        if self.backend not in ("auto", "tiffslide", "openslide", "image", "omezarr"):
            raise ConfigError(f"unknown backend {self.backend!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["formats"] = list(self.formats)
        return d

    def output_affecting(self) -> dict[str, Any]:
        """Settings that change the result (not workers, overwrite, device): used in resume keys."""
        d = self.to_dict()
        for k in ("workers", "overwrite", "device", "formats", "geojson_gzip"):
            d.pop(k)
        return d
