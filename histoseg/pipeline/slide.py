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
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from histoseg.atomic import atomic_file, remove_stale_temporaries
from histoseg.config import SegmentConfig, SlideStatus
from histoseg.distributed import TaskRunner
from histoseg.distributed.lazy import LazyRunner
from histoseg.distributed.runner import release_freed_memory
from histoseg.errors import OutputError
from histoseg.export import write_provenance, write_success
from histoseg.inference import DensePredictor, NetworkPredictor
from histoseg.inference.quantize import CALIBRATION_SUFFIX
from histoseg.pipeline import folder as outdir
from histoseg.pipeline.adapt import adapt_slide, adapt_stage_text
from histoseg.pipeline.calibrate import calibrate_slide
from histoseg.pipeline.identity import slide_fingerprint
from histoseg.pipeline.plan import PlanOutcome, SlidePlan, default_predictor, plan_slide
from histoseg.pipeline.record import provenance_record
from histoseg.pipeline.resume import STORE_DIR, RegionStore, resume_settings
from histoseg.pipeline.stitched import BandExport, RegionTables, opening_in_background, stitch_all
from histoseg.pipeline.tasks import run_region
from histoseg.report import report_after_slide
from histoseg.types import InstanceTable, Region

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
MAX_UPSAMPLING = 8  # slide pixels at most this much coarser than the model's (per axis)
MANY_REGIONS = 20_000  # warn above this many regions (a mis-set --slide-mpp or a tiny --region-size)
# one adaptation at a time in this process: it seeds torch's global generator and sets its thread count,
# so two slides adapting at once (a pipelined batch) could change each other's weights
_ADAPT_LOCK = threading.Lock()


@dataclass
class SlideReport:
    """One row of the batch summary."""

    slide: str
    status: SlideStatus
    nuclei: int = 0
    seconds: float = 0.0
    message: str = ""
    output: str | None = None
    regions: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    regions_reused: int = 0  # finished regions loaded from an interrupted run's store


def run_plan(
    plan: SlidePlan,
    runner: TaskRunner,
    predictor: DensePredictor,
    on_region: Callable[[int, int], None] | None = None,
    store: RegionStore | None = None,
    on_done: Callable[[Region], None] | None = None,
    tables: RegionTables | None = None,
) -> tuple[PlanOutcome, RegionTables]:
    """Run the region tasks (only the ones ``store`` lacks); return the timings and the results' tables.

    Each result is saved to ``store`` here, on the client, as it arrives, so resuming works with any
    runner, and waits there (not in memory) until the slide is stitched band by band
    (:mod:`histoseg.pipeline.stitched`): reused and recomputed regions give the same nuclei as one
    uninterrupted run. ``on_done(region)`` is called once for every region whose table is ready, e.g.
    :meth:`BandExport.region_done`, which writes bands (and takes their tables) while other regions still run;
    the reused regions are handed over once the first task has been sent out, so the workers never wait for
    them. ``tables``: where the results go (default: a new ``RegionTables`` over ``store``). Timings cover the
    computed regions only; ``regions_wall`` leaves out the time spent in ``on_done``.
    """
    total = len(plan.regions)
    t0 = time.perf_counter()
    reused = store.finished(plan.regions, plan.spec.plane) if store is not None else set()
    todo = [r for r in plan.regions if r.key not in reused]
    if reused:
        log.info("%s: reusing %d of %d finished regions", plan.path.name, len(reused), total)
        if on_region is not None:
            on_region(len(reused), total)
    tables = tables if tables is not None else RegionTables(plan, store)
    waiting = [r for r in plan.regions if r.key in reused] if on_done is not None else []
    callback_s = 0.0

    def hand_over(regions: list[Region]) -> None:
        nonlocal callback_s
        if on_done is None:
            return
        t = time.perf_counter()
        for r in regions:
            on_done(r)
        callback_s += time.perf_counter() - t

    timings: dict[str, float] = {}
    computed = 0
    if todo and isinstance(predictor, NetworkPredictor):
        predictor.prepare()  # the engine's graph, written once here instead of in every worker
    stream = runner.imap_unordered(run_region, todo, plan.spec, predictor) if todo else iter(())
    try:
        for done, (_, res) in enumerate(stream, len(reused) + 1):
            tables.add(res.region, res.table)
            hand_over([*waiting, res.region])  # the reused ones once the tasks are out: a lazy runner sends on next()
            waiting = []
            for k, v in res.timings.items():
                timings[k] = timings.get(k, 0.0) + v
            computed += 1
            if on_region is not None:
                on_region(done, total)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:  # a failure here stops the runner's generator (its pending tasks) at once
            close()
    hand_over(waiting)  # every region was reused
    timings["regions_wall"] = time.perf_counter() - t0 - callback_s
    release_freed_memory()  # the region buffers kept for reuse (--workers 1) are not needed by the export's end
    return PlanOutcome(timings, len(reused), computed), tables


def run_regions_table(
    path: str | Path, config: SegmentConfig, runner: TaskRunner, predictor: DensePredictor | None = None
) -> InstanceTable:
    """The stitched nuclei of a slide, without writing outputs (tests, notebooks). An int8 engine is calibrated on
    the slide as ``segment`` calibrates it, in a temporary folder (its workers must see it: local runners)."""
    predictor = predictor or default_predictor(config)
    plan = plan_slide(path, config, predictor)
    with tempfile.TemporaryDirectory(prefix="histoseg-calibration-") as tmp:
        predictor, _ = calibrate_slide(plan, predictor, config, Path(tmp) / f"slide{CALIBRATION_SUFFIX}")
        outcome, tables = run_plan(plan, runner, predictor)
    return stitch_all(plan, tables, outcome)


def segment_slide(
    path: str | Path,
    out_root: str | Path,
    config: SegmentConfig,
    runner: TaskRunner,
    predictor: DensePredictor | None = None,
    on_region: Callable[[int, int], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> SlideReport:
    """Segment one slide into ``out_root/<stem>/``; raise a HistosegError on bad input.

    ``on_region(done, total)`` reports region progress; ``on_stage(text)`` names the slow stages before and
    after the regions (adaptation, export), so a progress display never sits silent at 0."""
    t_start = time.perf_counter()
    path = Path(path)
    stem = outdir.output_name(path)  # never empty, "." or "..", no separators, no leading dot
    out_dir = Path(out_root) / stem
    if (out_dir / SUCCESS).exists() and not config.overwrite:
        with outdir.FolderLock(out_dir):
            done = _finished(path, stem, out_dir, config)
        if done is not None:
            return done
    predictor = predictor or default_predictor(config)
    plan = plan_slide(path, config, predictor)
    outdir.check_writable(out_dir)
    with outdir.FolderLock(out_dir):  # one run at a time writes into a slide folder
        return _segment_locked(path, stem, out_dir, plan, config, runner, predictor, on_region, on_stage, t_start)


def _finished(path: Path, stem: str, out_dir: Path, config: SegmentConfig) -> SlideReport | None:
    """The skip report when ``out_dir`` already holds this slide's results under these settings (None: run
    it); raises OutputError when it holds another slide's or other settings' results."""
    done = outdir.finished_report(path, out_dir, config)
    if done is None:
        return None
    RegionStore.discard(out_dir)  # left behind when a run was killed right after _SUCCESS
    outdir.remove_intermediates(out_dir, stem, config)
    msg = "already done (_SUCCESS present" + (", other settings: --overwrite redoes it" * done["other_settings"]) + ")"
    return SlideReport(str(path), "skipped", nuclei=done["nuclei"], message=msg, output=str(out_dir))


def _segment_locked(
    path: Path,
    stem: str,
    out_dir: Path,
    plan: SlidePlan,
    config: SegmentConfig,
    runner: TaskRunner,
    predictor: DensePredictor,
    on_region: Callable[[int, int], None] | None,
    on_stage: Callable[[str], None] | None,
    t_start: float,
) -> SlideReport:
    """The writing part of ``segment_slide``, run while holding the folder's lock."""
    done = _finished(path, stem, out_dir, config)  # another run may have finished it while this one planned
    if done is not None:
        return done
    (out_dir / SUCCESS).unlink(missing_ok=True)
    remove_stale_temporaries(out_dir)  # only the atomic writers' own temporaries, by their exact names
    if isinstance(runner, LazyRunner) and (config.overwrite or not (out_dir / STORE_DIR).exists()):
        # regions will run (no interrupted run's regions to reuse): the workers start during adaptation
        runner.prestart(plan.regions)
    if on_stage is not None:
        on_stage(adapt_stage_text(plan, predictor, config))
    fp = slide_fingerprint(path)
    # the writers are open while the regions run: each finished band is written at once (BandExport); they open
    # (the Zarr root image: seconds) beside the adaptation, calibration and quantisation below
    tables = RegionTables(plan, None)
    with opening_in_background(BandExport(plan, tables, out_dir, stem, config, fp["hex"])) as opening:
        with _ADAPT_LOCK:
            predictor, adaptation = adapt_slide(plan, predictor, config, outdir.adapted_paths(out_dir, stem)[0])
        predictor, calibration = calibrate_slide(plan, predictor, config, outdir.calibration_path(out_dir, stem))
        if on_stage is not None:
            on_stage("regions")
        ok, png = cv2.imencode(".png", (plan.tissue * 255).astype(np.uint8))
        if not ok:
            raise OutputError(f"{path.name}: could not encode the tissue mask as PNG")
        with atomic_file(out_dir / "tissue_mask.png") as tmp:
            tmp.write_bytes(png.tobytes())
        store = _open_store(out_dir, plan, fp, predictor, config)
        tables.use_store(store)

        def region_done(region: Region) -> None:
            opening.result().region_done(region)  # waits for the writers the first time (opened long before)

        outcome, _ = run_plan(plan, runner, predictor, on_region, store, on_done=region_done, tables=tables)
        if on_stage is not None:
            on_stage("writing " + ", ".join(config.formats))
    outputs = opening.result()
    outputs.fill(outcome)
    timings = outcome.timings
    if outcome.edge_touching:
        log.warning(
            "%s: %d owned nuclei touch a halo edge (halo %d px may be too small for them)",
            plan.path.name,
            outcome.edge_touching,
            plan.halo,
        )
    seconds = time.perf_counter() - t_start
    timings["total"] = seconds
    record = provenance_record(plan, fp, predictor, config, outcome)
    record["processing"]["workers"] = _workers_used(runner)  # config.workers is the request (auto: the cap)
    record["adaptation"] = adaptation
    if calibration is not None:
        record["int8_calibration"] = calibration
    write_provenance(out_dir / "provenance.json", record)
    report_after_slide(out_dir, config)  # QC report.html (unless --no-report), from the files just written
    outdir.fsync_tree(out_dir)
    outdir.fsync_paths(write_success(out_dir, outdir.success_record(path, fp, config, outcome.nuclei)), out_dir)
    RegionStore.discard(out_dir)  # the final outputs are the record now
    outdir.remove_intermediates(out_dir, stem, config)  # adapted weights, calibration (unless --keep-adapted)
    return SlideReport(
        str(path),
        "ok",
        nuclei=outcome.nuclei,
        seconds=seconds,
        output=str(out_dir),
        regions=len(plan.regions),
        timings=timings,
        regions_reused=outcome.regions_reused,
    )


def _workers_used(runner: TaskRunner) -> int:
    """Worker processes of the batch's runner (1: this process; 0: none was started, every region so far was
    reused; a runner started for an earlier slide counts even where this slide reused all its regions):
    ``--workers auto`` runs a small slide in this process, so the request alone does not say."""
    if isinstance(runner, LazyRunner) and not runner.started:
        return 0
    return runner.n_workers


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
