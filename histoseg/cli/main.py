"""The ``histoseg`` command line: info, segment, train, evaluate, models.

Errors a user can cause print one line (``histoseg: error: ...``) and exit non-zero; a batch keeps going
past failed slides, prints a summary table and exits 1 if any slide failed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from histoseg import __version__
from histoseg.cli.models import add_models_parser, run_models
from histoseg.cli.report import add_report_parser, run_report
from histoseg.config import (
    ALL_FORMATS,
    AUTO_WORKERS,
    BACKENDS,
    CLUSTER_KINDS,
    LOCAL_CLUSTER,
    PRECISION_CHOICES,
    RUNTIME_CHOICES,
    TTA_CHOICES,
    VIEW_CHOICES,
    SegmentConfig,
)
from histoseg.errors import HistosegError

log = logging.getLogger("histoseg")


def _worker_count(s: str) -> int | str:
    """``--workers``: a count, or ``auto`` (resolved on this machine: ``histoseg.distributed.capacity``)."""
    if s == AUTO_WORKERS:
        return s
    try:
        return int(s)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number or {AUTO_WORKERS!r}: {s!r}") from exc


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from exc
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {s!r}")
    return v


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a whole number: {s!r}") from exc
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {s!r}")
    return v


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every default shown (unless the help already names it, or the option is a plain switch), examples kept
    as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        plain = any(action.default is v for v in (None, False, True, argparse.SUPPRESS))  # "is": 1 == True
        if "default" in text or plain or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


SEGMENT_EXAMPLES = """\
examples:
  # a folder of slides (recursive), results in results/<slide-stem>/
  histoseg segment /data/cohort1/ -o results/

  # two local worker processes (the default: one per usable core); outputs are identical to one worker
  histoseg segment "/data/cohort1/*.svs" -o results/ --workers 2

  # a SLURM cluster: 4 jobs of 8 single-threaded workers each (run on a login node)
  histoseg segment /shared/slides/ -o /shared/results/ --cluster slurm --jobs 4 --cores 8 \\
      --memory 32GB --walltime 04:00:00 --account myproject --queue cpu

  # a plain image or a slide without mpp metadata: give the µm per pixel of level 0
  histoseg segment scan.png -o results/ --slide-mpp 0.25
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="histoseg", description="Whole-slide nuclei segmentation.")
    p.add_argument("--version", action="version", version=f"histoseg {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="show a slide's metadata (vendor, levels, mpp, bounds offset)")
    info.add_argument("slide")
    info.add_argument("--backend", default=SegmentConfig.backend, choices=list(BACKENDS))
    info.add_argument("--json", action="store_true", help="print JSON")

    seg = sub.add_parser(
        "segment",
        help="segment slides into GeoJSON, OME-Zarr labels and Parquet",
        description="Find and measure every nucleus of each slide; one output folder per slide (OUT/<stem>/).",
        epilog=SEGMENT_EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    seg.add_argument("inputs", nargs="+", metavar="INPUT", help="slide files, folders (recursive) or globs")
    seg.add_argument("-o", "--output", required=True, help="output folder (one sub-folder per slide)")
    seg.add_argument(
        "--slide-mpp",
        type=_positive_float,
        default=None,
        help="µm per pixel of level 0, for slides without (or with wrong) metadata; default: the slide's own",
    )
    seg.add_argument("--model", default=SegmentConfig.model, help="registered model name or path to .safetensors")
    seg.add_argument("--region-size", type=int, default=SegmentConfig.region_size,
                     help="region core size in processing px (performance only: results do not depend on it)")
    seg.add_argument("--formats", default=",".join(SegmentConfig.formats),
                     help=f"comma list of {','.join(ALL_FORMATS)}")
    seg.add_argument("--geojson-gzip", action="store_true", help="write .geojson.gz")
    seg.add_argument("--overwrite", action="store_true", help="redo slides that already have _SUCCESS")
    seg.add_argument("--device", default=None, help="cpu, cuda or cuda:N; default: cpu, cuda with --gpus")
    seg.add_argument("--backend", default=SegmentConfig.backend, choices=list(BACKENDS), help="slide reader")
    seg.add_argument(
        "--strict-halo", action="store_true", help="fail when a nucleus touches a region's halo edge instead of warning"
    )
    seg.add_argument("--precision", default=SegmentConfig.precision, choices=list(PRECISION_CHOICES),
                     help="network arithmetic: auto = bf16 where the device computes it natively (AVX512-BF16/AMX "
                     "CPUs, Arm BF16, CUDA with bf16), fp32 elsewhere; provenance.json records the choice and why")
    seg.add_argument("--runtime", default=SegmentConfig.runtime, choices=list(RUNTIME_CHOICES),
                     help="engine of the network: auto = OpenVINO on the CPU where installed (1.5-1.6x PyTorch, same "
                     "accuracy), in int8 calibrated on the slide on x86 CPUs (without native bf16 1.0-1.4x fp32 "
                     "by CPU, with it as fast as bf16 and, unlike bf16, the same nuclei at any region size; "
                     "MoNuSeg-test PQ within 0.002, other nuclei at the margin), PyTorch elsewhere; torch is the "
                     "reference; provenance.json records the engine and why")
    seg.add_argument("--views", type=int, default=SegmentConfig.views, choices=list(VIEW_CHOICES),
                     help="average the network's maps over 1, 4 (mirrored) or 8 (mirrored and transposed) views of "
                     "each region: better nuclei and types (typed model, MoNuSeg test: PQ 0.588 -> 0.603 with 4) at "
                     "4x or 8x the network time")
    seg.add_argument("--keep-adapted", action="store_true",
                     help="keep the per-slide adapted weights (<stem>.adapted.safetensors) after _SUCCESS")
    seg.add_argument("--no-report", dest="report", action="store_false",
                     help="do not write the per-slide QC report (report.html) and the batch index.html")
    _add_tta_arguments(seg)
    _add_cluster_arguments(seg)

    ad = sub.add_parser("adapt", help="adapt the model to one slide and save the adapted weights")
    ad.add_argument("slide")
    ad.add_argument("--output", required=True, help="adapted weights (.safetensors; the card is written beside)")
    ad.add_argument("--model", default=SegmentConfig.model, help="registered model name or path to .safetensors")
    ad.add_argument("--slide-mpp", type=_positive_float, default=None)
    ad.add_argument("--backend", default=SegmentConfig.backend, choices=list(BACKENDS))
    _add_tta_arguments(ad, default="g2p")

    tr = sub.add_parser("train", help="train a model from a YAML config")
    tr.add_argument("--config", required=True)
    tr.add_argument("--iterations", type=int, default=None, help="override the config's iterations")
    tr.add_argument("--device", default=None, help="override the config's device: cpu, cuda or cuda:N")

    ft = sub.add_parser("finetune", help="fine-tune a model from point clicks exported by QuPath (GeoJSON)")
    ft.add_argument("slides", nargs="*", help="the slides the points were clicked on (one points file each)")
    ft.add_argument("--points", nargs="+", action="extend", required=True,
                    help="QuPath GeoJSON exports of Point/MultiPoint annotations with classes, one per slide, in order "
                    "(before the slides too: --points A.geojson SLIDE...; the .geojson/.json files are the points)")
    ft.add_argument("--output", required=True, help="fine-tuned weights (.safetensors; the card is written beside)")
    ft.add_argument("--model", default=SegmentConfig.model, help="model to start from (name or .safetensors path)")
    ft.add_argument("--slide-mpp", type=_positive_float, default=None)
    ft.add_argument("--iterations", type=int, default=200, help="optimiser steps (batch of 4 crops of 256 px)")
    ft.add_argument("--seed", type=int, default=0)

    from histoseg.cli.cohort import add_cohort_parser

    add_cohort_parser(sub, _HelpFormatter)

    ev = sub.add_parser("evaluate", help="evaluate a model on a public dataset")
    ev.add_argument("--dataset", required=True, choices=["monuseg-test", "dsb", "crchisto-val"])
    ev.add_argument("--model", default=SegmentConfig.model)
    ev.add_argument("--limit", type=_positive_int, default=None, help="first N images only")
    ev.add_argument("--json", default=None, help="also write the results as JSON to this file")
    ev.add_argument("--precision", default=SegmentConfig.precision, choices=list(PRECISION_CHOICES),
                    help="network arithmetic (auto: bf16 only where native)")
    ev.add_argument("--views", type=int, default=SegmentConfig.views, choices=list(VIEW_CHOICES),
                    help="average the maps over 1, 4 or 8 views, as segment --views")

    add_models_parser(sub)
    add_report_parser(sub)
    return p


def _add_tta_arguments(p: argparse.ArgumentParser, default: str | None = None) -> None:
    g = p.add_argument_group("per-slide test-time adaptation")
    g.add_argument("--tta", default=default or SegmentConfig.tta, choices=list(TTA_CHOICES),
                   help="adaptation method run once per slide before its regions; auto: g2p for a network model "
                   "whose card has per-slide source statistics, none otherwise (default: %(default)s)")
    g.add_argument("--tta-regions", type=int, default=SegmentConfig.tta_regions, help="tissue crops sampled (K)")
    g.add_argument("--tta-steps", type=int, default=SegmentConfig.tta_steps, help="adaptation steps")


def _add_cluster_arguments(seg: argparse.ArgumentParser) -> None:
    """Where region tasks run (histoseg.distributed.ClusterSpec); job-queue flags override --cluster-config."""
    g = seg.add_argument_group("where to run (Dask)")
    g.add_argument(
        "--cluster", default=LOCAL_CLUSTER, choices=list(CLUSTER_KINDS), help="local processes or a job queue"
    )
    g.add_argument(
        "--workers",
        type=_worker_count,
        default=None,
        metavar="N|auto",
        help="local worker processes (default auto: one per usable core, as many as the memory holds; "
        "1 runs in this process)",
    )
    g.add_argument("--gpus", default=None, metavar="all|IDS", help="local: one worker per GPU, e.g. all or 0,1")
    g.add_argument(
        "--scheduler", default=None, metavar="ADDRESS", help="use a running Dask scheduler (tcp://host:8786)"
    )
    g.add_argument("--jobs", type=int, default=None, help="job queue: number of worker jobs to submit (default 1)")
    g.add_argument("--cluster-config", default=None, metavar="YAML", help="job queue: dask-jobqueue YAML settings")
    g.add_argument("--cores", type=int, default=None, help="job queue: cores per job (one worker per core; default 1)")
    g.add_argument("--memory", default=None, help="job queue: memory per job, e.g. 16GB")
    g.add_argument("--walltime", default=None, help="job queue: time limit per job, e.g. 02:00:00")
    g.add_argument("--account", default=None, help="job queue: account (project) to charge")
    g.add_argument("--queue", default=None, help="job queue: queue or partition")
    g.add_argument(
        "--job-extra",
        action="append",
        default=[],
        metavar="DIRECTIVE",
        help="job queue: extra scheduler directive, repeatable, e.g. --job-extra=--gres=gpu:1",
    )
    g.add_argument("--interface", default=None, help="job queue: network interface of scheduler and workers, e.g. ib0")
    g.add_argument(
        "--worker-timeout",
        type=_positive_float,
        default=600.0,
        metavar="SECONDS",
        help="job queue or --scheduler: give up when no worker joined within this time (default 600)",
    )


# third-party loggers that talk to users who did not ask (-v shows everything)
_QUIET = {
    "distributed": logging.WARNING,
    "tornado": logging.WARNING,
    "asyncio": logging.CRITICAL,  # "Task was destroyed but it is pending!" from zarr's event loop on a bad tile
    "tifffile": logging.ERROR,
    "PIL": logging.WARNING,
    "numcodecs": logging.WARNING,
}


def _setup_logging(verbose: bool) -> None:
    """histoseg's own messages at INFO (DEBUG with -v); other libraries at WARNING or quieter, so an error
    stays one line. Dask reads its logging level from the environment when it is first imported (later, in
    the segment command and in its worker processes), so it is set there."""
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "debug" if verbose else "warning")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("histoseg").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        for name, level in _QUIET.items():
            logging.getLogger(name).setLevel(level)
        _quiet_abandoned_coroutines()


def _quiet_abandoned_coroutines() -> None:
    """A read that fails inside zarr's async chunk fetch (a corrupt tile) leaves its sibling coroutines
    unawaited; at exit Python prints a warning and a 15-line traceback for each ("coroutine ... was never
    awaited", "Event loop is closed"), burying the one error line. Those go to the debug log instead; any
    other unraisable exception is still printed."""
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
    default_hook = sys.unraisablehook

    def hook(info: Any) -> None:
        obj, exc = info.object, info.exc_value
        if inspect.iscoroutine(obj) or (isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)):
            log.debug("ignored after an aborted read: %r in %r", exc, obj)
            return
        default_hook(info)

    sys.unraisablehook = hook


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        if args.command == "info":
            return _info(args)
        if args.command == "segment":
            from histoseg.cli.segment import run_segment

            return run_segment(args)
        if args.command == "adapt":
            from histoseg.cli.learn import run_adapt

            return run_adapt(args)
        if args.command == "train":
            from histoseg.cli.learn import run_train

            return run_train(args)
        if args.command == "finetune":
            from histoseg.cli.learn import run_finetune

            return run_finetune(args)
        if args.command == "adapt-cohort":
            from histoseg.cli.cohort import run_adapt_cohort

            return run_adapt_cohort(args)
        if args.command == "evaluate":
            from histoseg.cli.learn import run_evaluate

            return run_evaluate(args)
        if args.command == "report":
            return run_report(args)
        if args.command == "models":
            return run_models(args)
    except HistosegError as exc:
        print(f"histoseg: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("histoseg: interrupted", file=sys.stderr)
        return 130
    return 2


def _info(args: argparse.Namespace) -> int:
    from histoseg.io import open_slide

    with open_slide(args.slide, backend=args.backend) as r:
        m = r.meta
        d: dict[str, Any] = {
            "path": m.path,
            "backend": m.backend,
            "vendor": m.vendor,
            "dimensions": list(m.dimensions),
            "levels": [
                {"dimensions": list(dims), "downsample": ds}
                for dims, ds in zip(m.level_dimensions, m.level_downsamples, strict=True)
            ],
            "mpp": m.mpp,
            "objective_power": m.objective_power,
            "bounds_offset": list(m.bounds_offset),
        }
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        print(f"{'path':<16}{d['path']}")
        print(f"{'backend':<16}{d['backend']}")
        print(f"{'vendor':<16}{d['vendor']}")
        print(f"{'dimensions':<16}{d['dimensions'][0]} x {d['dimensions'][1]}")
        mpp = f"{m.mpp:.4f} µm/px" if m.mpp else "unknown (pass --slide-mpp to segment)"
        print(f"{'mpp':<16}{mpp}")
        print(f"{'objective':<16}{m.objective_power if m.objective_power else 'unknown'}")
        print(f"{'bounds offset':<16}{m.bounds_offset[0]}, {m.bounds_offset[1]}")
        for i, lv in enumerate(d["levels"]):
            dims = f"{lv['dimensions'][0]} x {lv['dimensions'][1]}"
            print(f"{'level ' + str(i):<16}{dims}  (downsample {lv['downsample']:.3f})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
