"""``histoseg segment``: progress on a terminal, plain log lines otherwise, a summary table at the end."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histoseg.config import AUTO_WORKERS, LOCAL_CLUSTER, SegmentConfig
from histoseg.distributed import ClusterSpec
from histoseg.distributed.capacity import auto_workers
from histoseg.errors import ConfigError

if TYPE_CHECKING:
    from histoseg.pipeline import SlideReport

log = logging.getLogger("histoseg")


def worker_count(args: argparse.Namespace) -> int:
    """``--workers``: the given count; ``auto`` (or not given) on a plain local cluster: one worker per usable
    core that the memory (and, with ``--device cuda``, the shared GPU's free memory) holds
    (``histoseg.distributed.capacity``); otherwise 1 (``--gpus`` workers, a running scheduler and job queues size
    themselves)."""
    if args.workers not in (None, AUTO_WORKERS):
        return int(args.workers)
    if args.cluster == LOCAL_CLUSTER and args.gpus is None and args.scheduler is None:
        return auto_workers(args.device or "cpu")
    return 1


def cluster_from_args(args: argparse.Namespace) -> ClusterSpec:
    """The ``--cluster``/``--workers``/``--gpus``/job-queue flags as a checked ``ClusterSpec``."""
    return ClusterSpec(
        kind=args.cluster,
        workers=worker_count(args),
        auto=args.workers in (None, AUTO_WORKERS),
        gpus=args.gpus,
        scheduler=args.scheduler,
        jobs=1 if args.jobs is None else args.jobs,
        config_file=args.cluster_config,
        cores=args.cores,
        memory=args.memory,
        walltime=args.walltime,
        account=args.account,
        queue=args.queue,
        job_extra=tuple(args.job_extra),
        interface=args.interface,
        worker_timeout=args.worker_timeout,
    )


def config_from_args(args: argparse.Namespace, cluster: ClusterSpec | None = None) -> SegmentConfig:
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    if not formats:
        raise ConfigError("--formats is empty")
    uses_gpus = cluster is not None and cluster.uses_gpus
    return SegmentConfig(
        model=args.model,
        slide_mpp=args.slide_mpp,
        region_size=args.region_size,
        workers=cluster.workers if cluster is not None else worker_count(args),
        formats=formats,
        geojson_gzip=args.geojson_gzip,
        overwrite=args.overwrite,
        device=args.device or ("cuda" if uses_gpus else "cpu"),
        backend=args.backend,
        strict_halo=args.strict_halo,
        tta=args.tta,
        tta_regions=args.tta_regions,
        tta_steps=args.tta_steps,
        precision=args.precision,
        runtime=args.runtime,
        views=args.views,
        keep_adapted=args.keep_adapted,
        report=args.report,
    )


def run_segment(args: argparse.Namespace) -> int:
    cluster = cluster_from_args(args)
    config = config_from_args(args, cluster)
    # the orchestration imports torch (~3 s): only once the options are known to be good, so a mistyped one is
    # answered at once
    from histoseg.pipeline import segment_batch

    out = Path(args.output)
    tty = sys.stderr.isatty()
    bars: dict[str, Any] = {}

    def on_slide_start(slide: Path, i: int, n: int) -> None:
        if tty:
            from tqdm import tqdm

            bars["region"] = tqdm(total=0, desc=f"[{i + 1}/{n}] {slide.name}", unit="region", leave=False)
        else:
            log.info("[%d/%d] %s", i + 1, n, slide)

    def on_region(done: int, total: int) -> None:
        bar = bars.get("region")
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)
        elif done == total or done % max(1, total // 10) == 0:
            log.info("  regions %d/%d", done, total)

    def on_stage(text: str) -> None:
        bar = bars.get("region")
        if bar is not None:
            bar.set_postfix_str(text)
        else:
            log.info("  %s", text)

    def on_slide_done(rep: SlideReport) -> None:
        bar = bars.pop("region", None)
        if bar is not None:
            bar.close()
        if rep.status == "failed":
            print(f"histoseg: error: {rep.message}", file=sys.stderr)
        else:
            log.info("  %s: %s, %d nuclei, %.1f s", Path(rep.slide).name, rep.status, rep.nuclei, rep.seconds)

    reports = segment_batch(
        args.inputs,
        out,
        config,
        cluster=cluster,
        on_slide_start=on_slide_start,
        on_region=on_region,
        on_slide_done=on_slide_done,
        on_stage=on_stage,
    )
    if not reports:  # one line, not an empty table and "0 slide(s)" above it
        print("histoseg: error: no slides found in the given inputs", file=sys.stderr)
        return 1
    print_summary(reports)
    return 1 if any(r.status == "failed" for r in reports) else 0


def print_summary(reports: list[SlideReport]) -> None:
    rows: list[tuple[str, str, str, str]] = [("slide", "nuclei", "seconds", "status")]
    for rep in reports:
        status = rep.status if rep.status != "failed" else f"failed: {rep.message}"
        rows.append((Path(rep.slide).name, str(rep.nuclei), f"{rep.seconds:.1f}", status))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    for r in rows:
        print(f"{r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]:>{w2}}  {r[3]}")
    n_failed = sum(r.status == "failed" for r in reports)
    print(
        f"{len(reports)} slide(s): {len(reports) - n_failed - sum(r.status == 'skipped' for r in reports)} done, "
        f"{sum(r.status == 'skipped' for r in reports)} skipped, {n_failed} failed"
    )
