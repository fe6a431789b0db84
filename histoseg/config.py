"""Settings: one frozen dataclass per job, and where the shared data lives.

The shared data folder is found through one setting, ``HISTOSEG_DATA``; without it, ``../shared/data``
beside the repository checkout (development installs) or beside the working directory.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from histoseg.errors import ConfigError


def data_dir() -> Path:
    """Folder of the shared slides and nuclei datasets (may not exist; callers check)."""
    env = os.environ.get("HISTOSEG_DATA")
    if env:
        return Path(env)
    repo_guess = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    if repo_guess.is_dir():
        return repo_guess
    return Path.cwd().parent / "shared" / "data"


# bounds that keep every size derived from the options allocatable (a region is held as float32 maps)
MIN_REGION_SIZE, MAX_REGION_SIZE = 64, 8192
MAX_WORKERS = 1024
AUTO_WORKERS = "auto"
"""``--workers auto`` (the command line's default): one local worker per usable core, as many as the memory holds
(``histoseg.distributed.capacity``); the library's ``SegmentConfig`` and ``ClusterSpec`` take a resolved count."""
MAX_TTA_REGIONS, MAX_TTA_STEPS = 64, 1000

Precision = Literal["auto", "bf16", "fp32"]
PRECISION_CHOICES: tuple[Precision, ...] = get_args(Precision)
"""``--precision``: ``auto`` (default) is bf16 where the device computes it natively, else fp32
(``histoseg.inference.precision``)."""

Runtime = Literal["auto", "torch", "openvino", "onnxruntime", "openvino-int8", "onnxruntime-int8"]
RUNTIME_CHOICES: tuple[Runtime, ...] = get_args(Runtime)
"""``--runtime``: the CPU engine of the network (``histoseg.inference.runtime``). ``auto`` (default) runs OpenVINO
where it is installed and the device is the CPU, PyTorch elsewhere: OpenVINO ran the shipped network 1.5x faster
than PyTorch in bf16 and 1.6x in fp32, at the same MoNuSeg-test PQ, with outputs identical across region sizes.
``torch`` is the reference engine. The ``-int8`` engines run a post-training int8 quantisation calibrated on
MoNuSeg training crops (``histoseg.inference.quantize``): faster again, maps within ~0.15 of fp32, MoNuSeg-test
PQ within 0.002."""
ENGINE_CHOICES: tuple[Runtime, ...] = tuple(r for r in RUNTIME_CHOICES if r != "auto")
"""The engines themselves: every ``--runtime`` but ``auto``, which picks one of them."""

Views = Literal[1, 4, 8]
VIEW_CHOICES: tuple[Views, ...] = get_args(Views)
"""``--views``: the network's maps averaged over 1 (default), 4 (mirrored) or 8 (mirrored and transposed) views of
each region (``histoseg.inference.views``): better nuclei and types at 4x or 8x the network time (README,
"Accuracy"); outputs stay independent of the region size and the worker count."""



def check_views(views: object, option: str = "--views") -> None:
    """ConfigError unless ``views`` is one of ``VIEW_CHOICES`` (1 but not True: ``True == 1`` in Python)."""
    if isinstance(views, bool) or views not in VIEW_CHOICES:
        raise ConfigError(f"{option} must be one of {', '.join(map(str, VIEW_CHOICES))}, got {views!r}")


_DEVICE = re.compile(r"cpu|cuda(?::(\d+))?")


def check_device(device: str, option: str = "--device", here: bool = False) -> None:
    """ConfigError unless ``device`` is ``cpu``, ``cuda`` or ``cuda:N``; with ``here``, also unless this machine
    has it (a CUDA build of torch that sees device N). Checked before a slide is read or a step is trained: a
    missing GPU otherwise surfaced as torch's "Torch not compiled with CUDA enabled" inside every slide's task.
    ``here`` is for work that runs in this process or on this machine's workers, not on a job queue's nodes."""
    m = _DEVICE.fullmatch(device) if isinstance(device, str) else None
    if m is None:
        raise ConfigError(f"{option} must be cpu, cuda or cuda:N, got {device!r}")
    if here and device != "cpu":
        import torch

        index = int(m.group(1) or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise ConfigError(
                f"{option} {device}: no such CUDA device on this machine (torch sees {torch.cuda.device_count()}; "
                "a CPU build of torch, no driver, or CUDA_VISIBLE_DEVICES hides it); use --device cpu"
            )


Backend = Literal["auto", "tiffslide", "openslide", "image", "omezarr"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)
"""``--backend``: the slide reader; ``auto`` picks one from the path and the file signature (``histoseg.io.open``)."""

TtaMethod = Literal["auto", "none", "g2p"]
TTA_CHOICES: tuple[TtaMethod, ...] = get_args(TtaMethod)
"""``--tta``: per-slide adaptation; ``auto`` is g2p where the model card has per-slide source statistics, else none
(``histoseg.tta``). AdaBN and Tent are not offered: on the development benchmark they lost on most shifted images
(issue 11); they remain in ``histoseg.tta`` as the benchmarks' baselines."""

OutputFormat = Literal["geojson", "zarr", "parquet"]
ALL_FORMATS: tuple[OutputFormat, ...] = get_args(OutputFormat)
"""``--formats``: QuPath GeoJSON, OME-Zarr labels, Parquet measurements; all three by default."""

SlideStatus = Literal["ok", "skipped", "failed"]
"""Outcome of one slide in a batch: segmented now, already done with the same settings, or failed."""

ClusterKind = Literal["local", "slurm", "pbs", "lsf"]
CLUSTER_KINDS: tuple[ClusterKind, ...] = get_args(ClusterKind)
"""``--cluster``: local processes or a job queue (``histoseg.distributed.cluster``)."""
LOCAL_CLUSTER: ClusterKind = "local"
"""The default ``--cluster``: worker processes on this machine (the other kinds are job queues)."""


@dataclass(frozen=True)
class SegmentConfig:
    """Everything that changes the outputs of ``segment`` (recorded in provenance.json)."""

    model: str = "default"
    slide_mpp: float | None = None
    region_size: int = 1024  # core size in processing pixels; also the Zarr chunk size
    workers: int = 1
    formats: tuple[OutputFormat, ...] = ALL_FORMATS
    geojson_gzip: bool = False
    overwrite: bool = False
    device: str = "cpu"
    backend: Backend = "auto"
    strict_halo: bool = False
    tissue_threshold: float | None = None  # None: Otsu on saturation
    min_tissue_fraction: float = 0.01  # of each 32-px tissue cell of the plane (tiling.TISSUE_CELL)
    np_threshold: float | None = None  # None: the model card's tuned value
    min_nucleus_area_um2: float = 3.0
    precision: Precision = "auto"  # network arithmetic: auto (bf16 only where native, else fp32) | bf16 | fp32
    runtime: Runtime = "auto"  # network engine: auto (OpenVINO where installed, else PyTorch) | RUNTIME_CHOICES
    views: Views = 1  # maps averaged over this many flipped/transposed views: VIEW_CHOICES
    tta: TtaMethod = "auto"  # per-slide adaptation: auto (g2p where the model supports it) | none | g2p
    tta_regions: int = 4  # K tissue crops sampled for adaptation (the shift benchmark's K)
    tta_steps: int = 10
    keep_adapted: bool = False  # keep OUT/<stem>/<stem>.adapted.safetensors after _SUCCESS (an intermediate)
    report: bool = True  # write OUT/<stem>/report.html (QC report) before _SUCCESS

    def __post_init__(self) -> None:
        bad = [f for f in self.formats if f not in ALL_FORMATS]
        if bad:
            raise ConfigError(f"unknown output format(s) {bad}; choose from {', '.join(ALL_FORMATS)}")
        if not MIN_REGION_SIZE <= self.region_size <= MAX_REGION_SIZE or self.region_size % 32:
            raise ConfigError(
                f"--region-size must be a multiple of 32 between {MIN_REGION_SIZE} and {MAX_REGION_SIZE}, "
                f"got {self.region_size}"
            )
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"--workers must be between 1 and {MAX_WORKERS}, got {self.workers}")
        if self.slide_mpp is not None and not (0.01 <= self.slide_mpp <= 100):
            raise ConfigError(f"--slide-mpp must be between 0.01 and 100 µm/px, got {self.slide_mpp}")
        check_device(self.device)
        if self.precision not in PRECISION_CHOICES:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISION_CHOICES)}, got {self.precision!r}")
        if self.runtime not in RUNTIME_CHOICES:
            raise ConfigError(f"--runtime must be one of {', '.join(RUNTIME_CHOICES)}, got {self.runtime!r}")
        check_views(self.views)
        if self.tta not in TTA_CHOICES:
            raise ConfigError(f"--tta must be one of {', '.join(TTA_CHOICES)}; got {self.tta!r}")
        if not (1 <= self.tta_regions <= MAX_TTA_REGIONS and 0 <= self.tta_steps <= MAX_TTA_STEPS):
            raise ConfigError(
                f"--tta-regions must be between 1 and {MAX_TTA_REGIONS} and --tta-steps between 0 and "
                f"{MAX_TTA_STEPS}, got {self.tta_regions} and {self.tta_steps}"
            )
        for name, value, lo, hi in (
            ("tissue_threshold", self.tissue_threshold, 0.0, 255.0),  # saturation, 0..255 (Python API only)
            ("min_tissue_fraction", self.min_tissue_fraction, 0.0, 1.0),
            ("np_threshold", self.np_threshold, 0.0, 1.0),
            ("min_nucleus_area_um2", self.min_nucleus_area_um2, 0.0, 1e4),
        ):
            if value is not None and not (math.isfinite(value) and lo <= value <= hi):
                raise ConfigError(f"{name} must be between {lo:g} and {hi:g}, got {value}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}; choose from {', '.join(BACKENDS)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["formats"] = list(self.formats)
        return d

    def output_affecting(self) -> dict[str, Any]:
        """Settings that change the result (not workers, overwrite, device): used in resume keys."""
        d = self.to_dict()
        for k in ("workers", "overwrite", "device", "formats", "geojson_gzip", "keep_adapted", "report"):
            d.pop(k)
        if d["views"] == 1:  # the default is left out, so outputs written before --views existed stay valid
            d.pop("views")
        return d


@dataclass(frozen=True)
class WatershedParams:
    """The watershed's thresholds (``histoseg.postprocess.watershed``), in physical units so one setting serves every
    processing resolution; a model card carries the ones its network was tuned with."""

    np_threshold: float = 0.5
    marker_threshold: float = 0.35  # HV Jacobian norm, as a fraction of a sharp border, above which a pixel is a border
    min_marker_um2: float = 2.0
    min_nucleus_um2: float = 3.0
    sobel_um: float = 0.5  # Sobel kernel extent in µm (3 px minimum)
    open_um: float = 0.5  # radius of the opening that cleans markers

    def ksize(self, mpp: float) -> int:
        """The Sobel kernel's side in pixels at ``mpp``: odd, 3 to 31."""
        k = int(round(self.sobel_um / mpp))
        k = max(3, k + (1 - k % 2))
        return min(k, 31)
