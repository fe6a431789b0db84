"""Plan one slide before any region runs: open and check it, derive the processing plane, the tissue mask and
cells, the regions and what every region task shares; and the default predictor that plans use.

Nothing is written here: planning is cheap and repeatable (a submit host without a GPU can plan).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoseg.config import SegmentConfig
from histoseg.errors import NoTissueError, SlideTooSmallError, UnsupportedImageError
from histoseg.inference import DensePredictor, NetworkPredictor
from histoseg.inference.precision import resolve_precision
from histoseg.inference.runtime import resolve_runtime
from histoseg.io import check_brightfield, open_slide
from histoseg.models import ModelCard, resolve_model
from histoseg.models.arch import STRIDE
from histoseg.pipeline.tasks import SlideTaskSpec
from histoseg.postprocess import WatershedParams
from histoseg.tiling import plan_regions, tissue_cells, tissue_mask
from histoseg.types import PlaneInfo, Region, SlideMeta

log = logging.getLogger(__name__)

MAX_UPSAMPLING = 8  # slide pixels at most this much coarser than the model's (per axis)
MANY_REGIONS = 20_000  # warn above this many regions (a mis-set --slide-mpp or a tiny --region-size)


def default_predictor(config: SegmentConfig) -> DensePredictor:
    """The shipped or named network, in the arithmetic ``--precision`` resolves to on this host's device.

    Precision is resolved once, here on the client, and travels with the predictor to every worker: the
    result must not depend on which machine of a cluster ran a region (pass ``--precision fp32`` when the
    compute nodes lack the submit host's native bf16)."""
    art = resolve_model(config.model)
    bf16 = resolve_precision(config.precision, config.device).bf16
    runtime = resolve_runtime(config.runtime, config.device, config.precision).runtime
    return NetworkPredictor(art, device=config.device, bf16=bf16, runtime=runtime, views=config.views)


@dataclass
class SlidePlan:
    """Everything decided about a slide before any region runs."""

    path: Path
    meta: SlideMeta
    card: ModelCard
    tissue: np.ndarray
    halo: int
    regions: list[Region]
    spec: SlideTaskSpec  # carries the slide-level context (``spec.plane``: scale, plane shape, classes)
    cells: np.ndarray  # tissue cells (tiling.TISSUE_CELL px) of the plane: which nuclei count

    @property
    def scale(self) -> float:
        """Level-0 pixels per processing-plane pixel."""
        return self.spec.plane.scale

    @property
    def plane_shape(self) -> tuple[int, int]:
        """(H, W) of the processing plane."""
        return self.spec.plane.plane_shape


def plan_slide(path: str | Path, config: SegmentConfig, predictor: DensePredictor) -> SlidePlan:
    """Open the slide, check it, derive the processing plane, tissue mask and regions."""
    path = Path(path)
    reader = open_slide(path, backend=config.backend, mpp=config.slide_mpp)
    try:
        check_brightfield(reader)
        card = predictor.card()
        scale = reader.plane_scale(card.mpp)  # raises MissingMppError naming --slide-mpp
        plane_shape = reader.plane_shape(card.mpp)
        if scale < 1 / MAX_UPSAMPLING:  # e.g. --slide-mpp 100: 200x upsampling, ~40,000 regions of blur
            raise UnsupportedImageError(
                f"{path.name}: {reader.meta.mpp} µm/px ({reader.meta.mpp_source}) is {1 / scale:.3g}x coarser than "
                f"the model's {card.mpp} µm/px (at most {MAX_UPSAMPLING}x); nuclei are not resolvable - check "
                "--slide-mpp or the slide's metadata"
            )
        if min(plane_shape) < STRIDE:
            raise SlideTooSmallError(
                f"{path.name}: {plane_shape[1]}x{plane_shape[0]} px at {card.mpp} µm/px is smaller than the "
                f"network's minimum input ({STRIDE} px)"
            )
        thumb, _ = reader.thumbnail(2048)
        meta = reader.meta
        mpp0 = float(meta.mpp) if meta.mpp else card.mpp / scale
    finally:
        reader.close()
    mask = tissue_mask(thumb, config.tissue_threshold)
    halo = card.halo_px()
    cells = tissue_cells(mask, plane_shape, config.min_tissue_fraction)
    regions = plan_regions(plane_shape, config.region_size, halo, cells)
    if not regions:
        raise NoTissueError(f"{path.name}: no tissue found (tissue mask is empty); nothing to segment")
    if len(regions) > MANY_REGIONS:
        log.warning("%s: %d regions of %d px; a larger --region-size runs fewer", path.name, len(regions),
                    config.region_size)
    overrides: dict[str, float] = {"min_nucleus_um2": config.min_nucleus_area_um2}
    if config.np_threshold is not None:
        overrides["np_threshold"] = config.np_threshold
    params = WatershedParams(**{**card.postprocess, **overrides})
    spec = SlideTaskSpec(
        slide_path=str(path.resolve()),
        backend=config.backend,
        slide_mpp=config.slide_mpp,
        mpp=card.mpp,
        plane=PlaneInfo(card.class_names, card.class_colors, mpp0, scale, plane_shape),
        params=params,
        strict_halo=config.strict_halo,
        type_weights=card.type_weights,
    )
    return SlidePlan(path, meta, card, mask, halo, regions, spec, cells)


@dataclass
class PlanOutcome:
    """Summed stage timings of a slide, how many regions were reused/computed, and, once stitched, how many
    nuclei it has and how many of them touch a halo edge."""

    timings: dict[str, float]
    regions_reused: int = 0
    regions_computed: int = 0
    nuclei: int = 0
    edge_touching: int = 0
