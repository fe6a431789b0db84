"""A batch over many slides: discover inputs, reuse one runner, carry on past failures.

Every slide ends as a ``SlideReport`` (ok, skipped or failed); a failure of one slide never stops the
others, and the caller turns failures into a non-zero exit code. One runner (local processes, GPUs, a
job queue or a scheduler address: ``ClusterSpec``) serves every slide, so jobs are submitted once.

With worker processes (``--workers`` > 1, GPUs, a job queue or a scheduler) slides are pipelined: the next
slide is planned, adapted and its regions queued while the current one runs, so workers that finish the
current slide's last regions go straight on to the next slide instead of idling while its tail regions,
stitching and export run. Every slide still has its own plan, adaptation and region tasks, so its outputs
are the same as in a one-after-another run; progress callbacks still see one slide after another, in
input order (:class:`_Turns`).
"""

from __future__ import annotations

import glob
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from histoseg.config import SegmentConfig
from histoseg.distributed import ClusterSpec, TaskRunner, open_runner
from histoseg.distributed.capacity import SMALL_SLIDE_INPUT
from histoseg.distributed.cluster import is_local_processes
from histoseg.distributed.runner import DaskRunner
from histoseg.errors import HistosegError, SlideNotFoundError
from histoseg.inference import DensePredictor, NetworkPredictor
from histoseg.io.open import IMAGE_SUFFIXES
from histoseg.io.open import SLIDE_SUFFIXES as IO_SLIDE_SUFFIXES
from histoseg.pipeline.folder import LOCK_NAME, output_name
from histoseg.pipeline.plan import default_predictor
from histoseg.pipeline.resume import STORE_DIR
from histoseg.pipeline.slide import SUCCESS, SlideReport, segment_slide
from histoseg.report import index_after_batch
from histoseg.tiling import network_input

log = logging.getLogger(__name__)

SLIDE_SUFFIXES = tuple(sorted(set(IO_SLIDE_SUFFIXES) | set(IMAGE_SUFFIXES)))
CLUSTER_LOGS = "_cluster_logs"  # job-queue worker logs, beside the slide folders
LOOKAHEAD = 1  # slides started ahead of the one the caller sees (worker processes only)


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
    lookahead: int | None = None,
) -> list[SlideReport]:
    """Segment every discovered slide; one report per slide, in input order.

    ``runner`` reuses a caller's runner; otherwise one is made from ``cluster`` (default: local, with
    ``config.workers`` processes), started at the first region task (a batch of finished slides submits
    no job) and closed at the end. Job-queue logs default to ``OUT/_cluster_logs``. ``lookahead``: slides
    run ahead of the current one (default: ``LOOKAHEAD`` with worker processes, 0 when tasks run in this
    process, where there is no idle worker to fill).
    """
    slides = discover(inputs)
    # a wrong --model, or weights that cannot be loaded, is one error for the whole batch, raised before any
    # slide folder is made, not one per slide
    predictor = predictor or default_predictor(config)
    if isinstance(predictor, NetworkPredictor):
        predictor.check()
    own_runner = runner is None
    spec = cluster if cluster is not None else ClusterSpec(workers=config.workers)
    spec.check_device(config.device, runs_here=own_runner)
    if lookahead is None:
        # a caller's runner: pipeline only onto Dask workers (anything else may run tasks in this process)
        in_process = not isinstance(runner, DaskRunner) if runner is not None else _in_process(spec)
        lookahead = 0 if in_process else LOOKAHEAD
    # --workers auto and one slide: regions to compute that give the network fewer than SMALL_SLIDE_INPUT pixels
    # run in this process
    small = SMALL_SLIDE_INPUT if spec.auto and len(slides) == 1 else 0
    run = runner or open_runner(
        spec, default_log_directory=Path(out_root) / CLUSTER_LOGS, lazy=True, small_below=small, size=network_input
    )
    errors = _input_errors(slides)
    turns = _Turns(slides, on_slide_start, on_region, on_stage, on_slide_done)

    def one(i: int) -> SlideReport:
        return _segment_one(slides[i], errors[i], out_root, config, run, predictor, turns.region(i), turns.stage(i))

    reports: list[SlideReport] = []
    try:
        if lookahead <= 0:
            for i in range(len(slides)):
                turns.begin(i)
                reports.append(one(i))
                turns.finish(i, reports[-1])
        else:
            pool = ThreadPoolExecutor(max_workers=lookahead + 1, thread_name_prefix="histoseg-slide")
            try:
                futures: dict[int, Future[SlideReport]] = {}
                for i in range(len(slides)):
                    for j in range(i, min(len(slides), i + lookahead + 1)):
                        if j not in futures:
                            futures[j] = pool.submit(one, j)
                    turns.begin(i)
                    reports.append(futures.pop(i).result())
                    turns.finish(i, reports[-1])
            finally:  # on an interrupt: start nothing more; closing the runner below ends the running slide
                pool.shutdown(wait=False, cancel_futures=True)
    finally:
        if own_runner:
            run.close()
    index_after_batch(out_root, reports, config.report)  # OUT/index.html, one row per slide (unless --no-report)
    return reports


def _in_process(spec: ClusterSpec) -> bool:
    """Whether ``spec`` runs region tasks in this process (``--workers 1`` on this machine)."""
    return is_local_processes(spec) and spec.workers <= 1


def _input_errors(slides: list[Path]) -> list[HistosegError | None]:
    """Per slide, the error known before it runs (missing file, an output name taken by an earlier slide),
    decided in input order so that pipelining cannot change which of two slides gets a name."""
    stems: dict[str, Path] = {}
    out: list[HistosegError | None] = []
    for slide in slides:
        stem = output_name(slide)
        if not slide.exists():  # checked first: a missing input must not take the name of a real one
            out.append(SlideNotFoundError(f"slide not found: {slide}"))
        elif stem in stems:
            out.append(HistosegError(f"{slide}: output name {stem!r} is already used by {stems[stem]} in this batch"))
        else:
            stems[stem] = slide
            out.append(None)
    return out


def _segment_one(
    slide: Path,
    error: HistosegError | None,
    out_root: str | Path,
    config: SegmentConfig,
    run: TaskRunner,
    predictor: DensePredictor,
    on_region: Callable[[int, int], None],
    on_stage: Callable[[str], None],
) -> SlideReport:
    """One slide's report: ok, skipped, or failed with the error's message (never raises a slide's error)."""
    try:
        if error is not None:
            raise error
        return segment_slide(slide, out_root, config, run, predictor, on_region, on_stage)
    except HistosegError as exc:
        return SlideReport(str(slide), "failed", message=str(exc))
    except Exception as exc:  # noqa: BLE001 - a batch reports unexpected errors and goes on
        log.exception("unexpected error on %s", slide)
        return SlideReport(str(slide), "failed", message=f"{type(exc).__name__}: {exc}")


class _Turns:
    """The caller's progress callbacks, one slide at a time in input order, while slides overlap.

    Callbacks of the current slide pass straight through; those of a slide running ahead are held (its
    latest region count and the stages since) and replayed, after ``on_slide_start``, when its turn comes.
    One lock serialises every callback, so a progress display is never called from two threads at once.
    """

    def __init__(
        self,
        slides: list[Path],
        on_slide_start: Callable[[Path, int, int], None] | None,
        on_region: Callable[[int, int], None] | None,
        on_stage: Callable[[str], None] | None,
        on_slide_done: Callable[[SlideReport], None] | None,
    ) -> None:
        self._slides = slides
        self._start, self._region, self._stage, self._done = on_slide_start, on_region, on_stage, on_slide_done
        self._lock = threading.RLock()
        self._current = -1
        self._held: dict[int, list[tuple[str, Any]]] = {}

    def region(self, i: int) -> Callable[[int, int], None]:
        return lambda done, total: self._event(i, "region", (done, total))

    def stage(self, i: int) -> Callable[[str], None]:
        return lambda text: self._event(i, "stage", text)

    def _event(self, i: int, kind: str, value: Any) -> None:
        with self._lock:
            if i == self._current:
                self._deliver(kind, value)
                return
            held = self._held.setdefault(i, [])
            if kind == "region" and held and held[-1][0] == "region":
                held[-1] = (kind, value)  # only the latest count matters
            else:
                held.append((kind, value))

    def _deliver(self, kind: str, value: Any) -> None:
        if kind == "region" and self._region is not None:
            self._region(*value)
        elif kind == "stage" and self._stage is not None:
            self._stage(value)

    def begin(self, i: int) -> None:
        """Slide ``i`` is now the one the caller sees: announce it, then replay what it did so far."""
        with self._lock:
            self._current = i
            if self._start is not None:
                self._start(self._slides[i], i, len(self._slides))
            for kind, value in self._held.pop(i, []):
                self._deliver(kind, value)

    def finish(self, i: int, report: SlideReport) -> None:
        with self._lock:
            if self._done is not None:
                self._done(report)
            self._current = -1
