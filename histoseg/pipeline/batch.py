"""A batch over many slides: discover inputs, reuse one runner, carry on past failures.

Every slide ends as a ``SlideReport`` (ok, skipped or failed); a failure of one slide never stops the
others, and the caller turns failures into a non-zero exit code. One runner (local processes, GPUs, a
job queue or a scheduler address: ``ClusterSpec``) serves every slide, so jobs are submitted once.
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from histoseg.config import SegmentConfig
from histoseg.distributed import ClusterSpec, TaskRunner, open_runner
from histoseg.errors import HistosegError, SlideNotFoundError
from histoseg.inference import DensePredictor, NetworkPredictor
from histoseg.io.open import IMAGE_SUFFIXES
from histoseg.io.open import SLIDE_SUFFIXES as IO_SLIDE_SUFFIXES
from histoseg.pipeline.folder import LOCK_NAME, output_name
from histoseg.pipeline.plan import default_predictor
from histoseg.pipeline.resume import STORE_DIR
from histoseg.pipeline.slide import SUCCESS, SlideReport, segment_slide
from histoseg.report import index_after_batch

log = logging.getLogger(__name__)

SLIDE_SUFFIXES = tuple(sorted(set(IO_SLIDE_SUFFIXES) | set(IMAGE_SUFFIXES)))
CLUSTER_LOGS = "_cluster_logs"  # job-queue worker logs, beside the slide folders


def discover(inputs: Iterable[str]) -> list[Path]:
    """Expand files, folders (recursive, slide suffixes only, hidden files skipped) and glob patterns.

    A path that neither exists nor matches a glob is kept, so it fails later as a missing slide. Folders
    and globs never yield histoseg's own outputs (a slide output folder, marked by ``_SUCCESS``, the lock
    file, the region store or ``provenance.json``), so ``-o`` inside an input folder does not turn a
    previous run's ``.zarr`` or tissue mask into a slide.
    """
    out: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve() if p.exists() else p
        if key not in seen:
            seen.add(key)
            out.append(p)

    for item in inputs:
        p = Path(item)
        if p.is_dir() and p.suffix.lower() == ".zarr":
            add(p)
        elif p.is_dir():
            for f in _walk(p):
                add(f)
        elif p.exists():
            add(p)
        elif any(ch in item for ch in "*?["):
            for m in sorted(glob.glob(item, recursive=True)):
                if (Path(m).is_file() or Path(m).suffix.lower() == ".zarr") and not _in_output(Path(m)):
                    add(Path(m))
        else:
            add(p)
    return out


def _walk(folder: Path) -> list[Path]:
    """Slide files and ``.zarr`` folders below ``folder`` (sorted, hidden entries skipped, no descent
    into a ``.zarr`` folder)."""
    out: list[Path] = []
    if _is_output_folder(folder):
        return out
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            out.extend([entry] if entry.suffix.lower() == ".zarr" else _walk(entry))
        elif entry.suffix.lower() in SLIDE_SUFFIXES:
            out.append(entry)
    return out


def _is_output_folder(folder: Path) -> bool:
    """A slide output folder of histoseg (finished, or one a run has started writing)."""
    markers = (SUCCESS, LOCK_NAME, STORE_DIR, "provenance.json")
    return folder.name == CLUSTER_LOGS or any((folder / m).exists() for m in markers)


def _in_output(path: Path) -> bool:
    return any(_is_output_folder(parent) for parent in path.parents)


def segment_batch(
    inputs: Iterable[str],
    out_root: str | Path,
    config: SegmentConfig,
    *,
    runner: TaskRunner | None = None,
    cluster: ClusterSpec | None = None,
    predictor: DensePredictor | None = None,
    on_slide_start: Callable[[Path, int, int], None] | None = None,
    on_region: Callable[[int, int], None] | None = None,
    on_slide_done: Callable[[SlideReport], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> list[SlideReport]:
    """Segment every discovered slide; one report per slide, in input order.

    ``runner`` reuses a caller's runner; otherwise one is made from ``cluster`` (default: local, with
    ``config.workers`` processes), started at the first region task (a batch of finished slides submits
    no job) and closed at the end. Job-queue logs default to ``OUT/_cluster_logs``.
    """
    slides = discover(inputs)
    # a wrong --model, or weights that cannot be loaded, is one error for the whole batch, raised before any
    # slide folder is made, not one per slide
    predictor = predictor or default_predictor(config)
    if isinstance(predictor, NetworkPredictor):
        predictor.check()
    stems: dict[str, Path] = {}
    own_runner = runner is None
    spec = cluster if cluster is not None else ClusterSpec(workers=config.workers)
    spec.check_device(config.device)
    run = runner or open_runner(spec, default_log_directory=Path(out_root) / CLUSTER_LOGS, lazy=True)
    reports: list[SlideReport] = []
    try:
        for i, slide in enumerate(slides):
            if on_slide_start:
                on_slide_start(slide, i, len(slides))
            stem = output_name(slide)
            try:
                if not slide.exists():  # checked first: a missing input must not take the name of a real one
                    raise SlideNotFoundError(f"slide not found: {slide}")
                if stem in stems:
                    raise HistosegError(f"{slide}: output name {stem!r} is already used by {stems[stem]} in this batch")
                stems[stem] = slide
                rep = segment_slide(slide, out_root, config, run, predictor, on_region, on_stage)
            except HistosegError as exc:
                rep = SlideReport(str(slide), "failed", message=str(exc))
            except Exception as exc:  # noqa: BLE001 - a batch reports unexpected errors and goes on
                log.exception("unexpected error on %s", slide)
                rep = SlideReport(str(slide), "failed", message=f"{type(exc).__name__}: {exc}")
            reports.append(rep)
            if on_slide_done:
                on_slide_done(rep)
    finally:
        if own_runner:
            run.close()
    index_after_batch(out_root, reports, config.report)  # OUT/index.html, one row per slide (unless --no-report)
    return reports
