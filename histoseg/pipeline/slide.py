"""Segment one slide end to end: open, plan, predict regions, stitch, export, ``_SUCCESS`` last.

Outputs go to ``OUT/<stem>/``. Every file is written atomically and ``_SUCCESS`` is written after all
of them, so a killed run never leaves a folder that a rerun would trust: without ``_SUCCESS`` the slide
is simply processed again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

import histoseg
from histoseg.config import SegmentConfig
from histoseg.distributed import TaskRunner
from histoseg.errors import NoTissueError, OutputError, SlideTooSmallError
from histoseg.export import (
    atomic_file,
    write_geojson,
    write_label_zarr,
    write_parquet,
    write_provenance,
    write_success,
)
from histoseg.inference import DensePredictor, NetworkPredictor
from histoseg.io import check_brightfield, open_slide
from histoseg.models import ModelCard, resolve_model
from histoseg.models.network import STRIDE
from histoseg.pipeline.tasks import RegionResult, SlideTaskSpec, run_region
from histoseg.postprocess import MEASUREMENTS, WatershedParams
from histoseg.stitching import stitch
from histoseg.tiling import plan_regions, tissue_mask
from histoseg.types import InstanceTable, Region, SlideMeta

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
FULL_HASH_LIMIT = 512 << 20  # slides above this size get a partial fingerprint (documented in provenance)


@dataclass
class SlideReport:
    """One row of the batch summary."""

    slide: str
    status: str  # ok | skipped | failed
    nuclei: int = 0
    seconds: float = 0.0
    message: str = ""
    output: str | None = None
    regions: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def slide_stem(path: str | Path) -> str:
    name = Path(path).name
    for suf in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem


def slide_fingerprint(path: str | Path) -> dict[str, Any]:
    """SHA-256 of the slide file (whole file up to 512 MB; beyond, size + first/last 64 MB)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    with open(p, "rb") as f:
        if size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
            kind = "sha256"
        else:
            h.update(str(size).encode())
            h.update(f.read(64 << 20))
            f.seek(size - (64 << 20))
            h.update(f.read(64 << 20))
            kind = "sha256-partial(size,first64MB,last64MB)"
    return {"kind": kind, "hex": h.hexdigest(), "size": size}


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {folder}: {exc.strerror or exc}") from exc
    if not os.access(folder, os.W_OK):
        raise OutputError(f"output folder {folder} is not writable")


def default_predictor(config: SegmentConfig) -> DensePredictor:
    art = resolve_model(config.model)
    return NetworkPredictor(art, device=config.device, bf16=bool(config.extra.get("bf16", False)))


@dataclass
class SlidePlan:
    """Everything decided about a slide before any region runs."""

    path: Path
    meta: SlideMeta
    card: ModelCard
    scale: float
    plane_shape: tuple[int, int]
    tissue: np.ndarray
    halo: int
    regions: list[Region]
    spec: SlideTaskSpec


def plan_slide(path: str | Path, config: SegmentConfig, predictor: DensePredictor) -> SlidePlan:
    """Open the slide, check it, derive the processing plane, tissue mask and regions."""
    path = Path(path)
    reader = open_slide(path, backend=config.backend, mpp=config.slide_mpp)
    try:
        check_brightfield(reader)
        card = predictor.card()
        scale = reader.plane_scale(card.mpp)  # raises MissingMppError naming --slide-mpp
        plane_shape = reader.plane_shape(card.mpp)
        if min(plane_shape) < STRIDE:
            raise SlideTooSmallError(
                f"{path.name}: {plane_shape[1]}x{plane_shape[0]} px at {card.mpp} µm/px is smaller than the "
                f"network's minimum input ({STRIDE} px)"
            )
        thumb, _ = reader.thumbnail(2048)
        meta = reader.meta
    finally:
        reader.close()
    mask = tissue_mask(thumb, config.tissue_threshold)
    halo = card.halo_px()
    regions = plan_regions(plane_shape, config.region_size, halo, mask, config.min_tissue_fraction)
    if not regions:
        raise NoTissueError(f"{path.name}: no tissue found (tissue mask is empty); nothing to segment")
    overrides: dict[str, float] = {"min_nucleus_um2": config.min_nucleus_area_um2}
    if config.np_threshold is not None:
        overrides["np_threshold"] = config.np_threshold
    params = WatershedParams(**{**card.postprocess, **overrides})
    spec = SlideTaskSpec(
        slide_path=str(path.resolve()),
        backend=config.backend,
        slide_mpp=config.slide_mpp,
        mpp=card.mpp,
        plane_shape=plane_shape,
        params=params,
        strict_halo=config.strict_halo,
    )
    return SlidePlan(path, meta, card, scale, plane_shape, mask, halo, regions, spec)


def run_plan(
    plan: SlidePlan,
    runner: TaskRunner,
    predictor: DensePredictor,
    on_region: Callable[[int, int], None] | None = None,
) -> tuple[InstanceTable, dict[str, float]]:
    """Run every region task, then stitch; returns the slide's table and summed stage timings."""
    results: list[RegionResult] = []
    t0 = time.perf_counter()
    for done, (_, res) in enumerate(runner.imap_unordered(run_region, plan.regions, plan.spec, predictor), 1):
        results.append(res)
        if on_region is not None:
            on_region(done, len(plan.regions))
    timings = _sum_timings(results)
    timings["regions_wall"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mpp0 = float(plan.meta.mpp) if plan.meta.mpp else plan.card.mpp / plan.scale
    template = InstanceTable.empty(
        plan.card.class_names, plan.card.class_colors, mpp0, plan.scale, plan.plane_shape, MEASUREMENTS
    )
    table = stitch([(r.region, r.table) for r in results], template)
    timings["stitch"] = time.perf_counter() - t0
    if table.edge_touching:
        log.warning(
            "%s: %d owned nuclei touch a halo edge (halo %d px may be too small for them)",
            plan.path.name,
            table.edge_touching,
            plan.halo,
        )
    return table, timings


def run_regions_table(
    path: str | Path, config: SegmentConfig, runner: TaskRunner, predictor: DensePredictor | None = None
) -> InstanceTable:
    """The stitched nuclei of a slide, without writing anything (tests, notebooks)."""
    predictor = predictor or default_predictor(config)
    return run_plan(plan_slide(path, config, predictor), runner, predictor)[0]


def segment_slide(
    path: str | Path,
    out_root: str | Path,
    config: SegmentConfig,
    runner: TaskRunner,
    predictor: DensePredictor | None = None,
    on_region: Callable[[int, int], None] | None = None,
) -> SlideReport:
    """Segment one slide into ``out_root/<stem>/``; raise a HistosegError on bad input."""
    t_start = time.perf_counter()
    path = Path(path)
    stem = slide_stem(path)
    out_dir = Path(out_root) / stem
    if (out_dir / SUCCESS).exists() and not config.overwrite:
        return SlideReport(str(path), "skipped", message="already done (_SUCCESS present)", output=str(out_dir))
    predictor = predictor or default_predictor(config)
    plan = plan_slide(path, config, predictor)
    _check_writable(out_dir)
    (out_dir / SUCCESS).unlink(missing_ok=True)
    _remove_stale_temporaries(out_dir)
    ok, png = cv2.imencode(".png", (plan.tissue * 255).astype(np.uint8))
    with atomic_file(out_dir / "tissue_mask.png") as tmp:
        tmp.write_bytes(png.tobytes())
    table, timings = run_plan(plan, runner, predictor, on_region)
    fp = slide_fingerprint(path)
    t0 = time.perf_counter()
    if "geojson" in config.formats:
        write_geojson(table, out_dir / f"{stem}.geojson", slide_key=fp["hex"], gzip=config.geojson_gzip)
    if "zarr" in config.formats:
        write_label_zarr(table, out_dir / f"{stem}.zarr", chunk=config.region_size)
    if "parquet" in config.formats:
        write_parquet(table, out_dir / f"{stem}.nuclei.parquet")
    timings["export"] = time.perf_counter() - t0
    seconds = time.perf_counter() - t_start
    timings["total"] = seconds
    write_provenance(out_dir / "provenance.json", _provenance(plan, fp, predictor, config, table, timings))
    write_success(out_dir)
    return SlideReport(
        str(path),
        "ok",
        nuclei=len(table),
        seconds=seconds,
        output=str(out_dir),
        regions=len(plan.regions),
        timings=timings,
    )


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Hidden temporaries left by a killed run (atomic writers name them ``.<target>.<tag>-<hex>``)."""
    for p in out_dir.iterdir():
        if p.name.startswith("."):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _sum_timings(results: list[RegionResult]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in results:
        for k, v in r.timings.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _provenance(
    plan: SlidePlan,
    fp: dict[str, Any],
    predictor: DensePredictor,
    config: SegmentConfig,
    table: InstanceTable,
    timings: dict[str, float],
) -> dict[str, Any]:
    art = getattr(predictor, "artifact", None)
    meta, card, path = plan.meta, plan.card, plan.path
    return {
        "histoseg_version": histoseg.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "slide": {
            "path": str(path.resolve()),
            "fingerprint": fp,
            "backend": meta.backend,
            "vendor": meta.vendor,
            "dimensions": list(meta.dimensions),
            "levels": meta.level_count,
            "mpp": meta.mpp,
            "mpp_source": meta.mpp_source,
            "objective_power": meta.objective_power,
            "bounds_offset": list(meta.bounds_offset),
        },
        "model": {
            "name": card.name,
            "weights": str(art.weights) if art else None,
            "sha256": art.sha256() if art else None,
            "mpp": card.mpp,
        },
        "adaptation": {"method": "none"},
        "processing": {
            "mpp": card.mpp,
            "scale_level0_per_plane_px": plan.scale,
            "plane_shape": list(plan.plane_shape),
            "region_size": config.region_size,
            "halo": plan.halo,
            "regions": len(plan.regions),
            "halo_edge_nuclei": table.edge_touching,
        },
        "config": config.to_dict(),
        "nuclei": len(table),
        "timings_s": timings,
    }
