"""Segment one slide end to end: open, plan, predict regions, stitch, export, ``_SUCCESS`` last.

Outputs go to ``OUT/<stem>/``. Every file is written atomically and ``_SUCCESS`` is written after all
of them, so a killed run never leaves a folder that a rerun would trust: without ``_SUCCESS`` the slide
is processed again. Regions are resumable too: each finished region is stored (``OUT/<stem>/_regions/``,
see :mod:`histoseg.pipeline.resume`) as its result arrives, a rerun under the same settings computes
only the missing ones, and the store is deleted once ``_SUCCESS`` is written. ``--overwrite`` trusts
nothing: it also discards stored regions.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

import histoseg
from histoseg.config import SegmentConfig
from histoseg.distributed import TaskRunner
from histoseg.errors import ConfigError, NoTissueError, OutputError, SlideTooSmallError
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
from histoseg.pipeline.adapt import adapt_to_slide, sample_crops
from histoseg.pipeline.resume import RegionStore, resume_settings, slide_fingerprint
from histoseg.pipeline.tasks import RegionResult, SlideTaskSpec, run_region
from histoseg.postprocess import MEASUREMENTS, WatershedParams
from histoseg.stitching import stitch
from histoseg.tiling import plan_regions, tissue_mask
from histoseg.tta import TTASettings, has_slide_statistics
from histoseg.types import InstanceTable, Region, SlideMeta

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"


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
    regions_reused: int = 0  # finished regions loaded from an interrupted run's store


def slide_stem(path: str | Path) -> str:
    name = Path(path).name
    for suf in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {folder}: {exc.strerror or exc}") from exc
    if not os.access(folder, os.W_OK):
        raise OutputError(f"output folder {folder} is not writable")


def default_predictor(config: SegmentConfig) -> DensePredictor:
    art = resolve_model(config.model)
    return NetworkPredictor(art, device=config.device, bf16=config.precision == "bf16")


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


@dataclass
class PlanOutcome:
    """The stitched table of a slide, summed stage timings and how many regions were reused/computed."""

    table: InstanceTable
    timings: dict[str, float]
    regions_reused: int = 0
    regions_computed: int = 0


def run_plan(
    plan: SlidePlan,
    runner: TaskRunner,
    predictor: DensePredictor,
    on_region: Callable[[int, int], None] | None = None,
    store: RegionStore | None = None,
) -> PlanOutcome:
    """Run the region tasks (only the ones ``store`` lacks), then stitch.

    Each result is saved to ``store`` here, on the client, as it arrives, so resuming works with any
    runner. Stitching orders regions by raster and instances by anchor, so reused and recomputed
    regions give the same table as one uninterrupted run. Timings cover the computed regions only.
    """
    total = len(plan.regions)
    t0 = time.perf_counter()
    reused = store.load_many(plan.regions) if store is not None else {}
    parts: list[tuple[Region, InstanceTable]] = [(r, reused[r.key]) for r in plan.regions if r.key in reused]
    todo = [r for r in plan.regions if r.key not in reused]
    if reused:
        log.info("%s: reusing %d of %d finished regions", plan.path.name, len(reused), total)
        if on_region is not None:
            on_region(len(reused), total)
    results: list[RegionResult] = []
    stream = runner.imap_unordered(run_region, todo, plan.spec, predictor) if todo else iter(())
    for done, (_, res) in enumerate(stream, len(reused) + 1):
        if store is not None:
            store.save(res.region, res.table)
        results.append(res)
        if on_region is not None:
            on_region(done, total)
    timings = _sum_timings(results)
    timings["regions_wall"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mpp0 = float(plan.meta.mpp) if plan.meta.mpp else plan.card.mpp / plan.scale
    template = InstanceTable.empty(
        plan.card.class_names, plan.card.class_colors, mpp0, plan.scale, plan.plane_shape, MEASUREMENTS
    )
    table = stitch(parts + [(r.region, r.table) for r in results], template)
    timings["stitch"] = time.perf_counter() - t0
    if table.edge_touching:
        log.warning(
            "%s: %d owned nuclei touch a halo edge (halo %d px may be too small for them)",
            plan.path.name,
            table.edge_touching,
            plan.halo,
        )
    return PlanOutcome(table, timings, len(reused), len(results))


def run_regions_table(
    path: str | Path, config: SegmentConfig, runner: TaskRunner, predictor: DensePredictor | None = None
) -> InstanceTable:
    """The stitched nuclei of a slide, without writing anything (tests, notebooks)."""
    predictor = predictor or default_predictor(config)
    return run_plan(plan_slide(path, config, predictor), runner, predictor).table


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
        RegionStore.discard(out_dir)  # left behind when a run was killed right after _SUCCESS
        return SlideReport(str(path), "skipped", message="already done (_SUCCESS present)", output=str(out_dir))
    predictor = predictor or default_predictor(config)
    plan = plan_slide(path, config, predictor)
    _check_writable(out_dir)
    (out_dir / SUCCESS).unlink(missing_ok=True)
    _remove_stale_temporaries(out_dir)
    predictor, adaptation = _adapt(plan, predictor, config, out_dir / f"{stem}.adapted.safetensors")
    ok, png = cv2.imencode(".png", (plan.tissue * 255).astype(np.uint8))
    if not ok:
        raise OutputError(f"{path.name}: could not encode the tissue mask as PNG")
    with atomic_file(out_dir / "tissue_mask.png") as tmp:
        tmp.write_bytes(png.tobytes())
    fp = slide_fingerprint(path)
    store = _open_store(out_dir, plan, fp, predictor, config)
    outcome = run_plan(plan, runner, predictor, on_region, store)
    table, timings = outcome.table, outcome.timings
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
    record = _provenance(plan, fp, predictor, config, outcome)
    record["adaptation"] = adaptation
    write_provenance(out_dir / "provenance.json", record)
    write_success(out_dir)
    RegionStore.discard(out_dir)  # the final outputs are the record now
    return SlideReport(
        str(path),
        "ok",
        nuclei=len(table),
        seconds=seconds,
        output=str(out_dir),
        regions=len(plan.regions),
        timings=timings,
        regions_reused=outcome.regions_reused,
    )


def _adapt(
    plan: SlidePlan, predictor: DensePredictor, config: SegmentConfig, target: Path
) -> tuple[DensePredictor, dict[str, Any]]:
    """Adapt the network to this slide once, before its regions run (``--tta``); workers then load the
    adapted artifact like any model. Runs single-threaded so the weights do not depend on the machine's
    thread count (outputs must not depend on the number of workers)."""
    artifact = getattr(predictor, "artifact", None)
    network = isinstance(predictor, NetworkPredictor) and artifact is not None
    method = config.tta
    if method == "auto":
        method = "g2p" if network and has_slide_statistics(plan.card.source_stats) else "none"
    if method == "none":
        return predictor, {"method": "none", "requested": config.tta}
    if not isinstance(predictor, NetworkPredictor) or artifact is None:
        raise ConfigError("--tta needs a network model (a registered name or a .safetensors path)")
    settings = TTASettings(method=method, regions=config.tta_regions, steps=config.tta_steps)
    t0 = time.perf_counter()
    crops = sample_crops(
        plan.path, plan.regions, plan.card.mpp, settings, config.backend, config.slide_mpp, plan.plane_shape
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        adapted, report = adapt_to_slide(artifact, crops, settings, target)
    finally:
        torch.set_num_threads(threads)
    report["seconds_total"] = time.perf_counter() - t0
    report["settings"] = asdict(settings)
    report["requested"] = config.tta
    report["source_weights_sha256"] = artifact.sha256()
    log.info(
        "%s: adapted with %s in %.1f s (loss %s -> %s%s)",
        plan.path.name, method, report["seconds_total"], report.get("loss_before"), report.get("loss_after"),
        ", source kept: " + report.get("guard", "") if report.get("kept_source") else "",
    )
    return replace(predictor, artifact=adapted), report


def _open_store(
    out_dir: Path, plan: SlidePlan, fp: dict[str, Any], predictor: DensePredictor, config: SegmentConfig
) -> RegionStore | None:
    """The slide's region store, or None when the predictor cannot be identified (nothing is reused)."""
    if config.overwrite:
        RegionStore.discard(out_dir)
    settings = resume_settings(
        slide_fp=fp,
        predictor=predictor,
        card=plan.card,
        spec=plan.spec,
        halo=plan.halo,
        region_size=config.region_size,
        config=config.output_affecting(),
    )
    if settings is None:
        log.info("%s: predictor has no identity (no artifact or fingerprint()); regions are not stored", plan.path)
        RegionStore.discard(out_dir)
        return None
    return RegionStore.open(out_dir, settings)


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Hidden temporaries left by a killed run (atomic writers name them ``.<target>.<tag>-<hex>``).

    The region store (``_regions/``) is not hidden on purpose: it survives, and cleans its own temporaries.
    """
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
    outcome: PlanOutcome,
) -> dict[str, Any]:
    table, timings = outcome.table, outcome.timings
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
            "regions_reused": outcome.regions_reused,
            "regions_computed": outcome.regions_computed,
            "halo_edge_nuclei": table.edge_touching,
        },
        "config": config.to_dict(),
        "nuclei": len(table),
        "timings_s": timings,
    }
