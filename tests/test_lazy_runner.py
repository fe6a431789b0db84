"""A lazily started runner started ahead of need (``LazyRunner.prestart``, issue 13): the workers start in the
background while the client adapts and calibrates; one start in all, its error raised by the first real request,
nothing left running after close; ``segment`` starts ahead unless an interrupted run's regions may be reused."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from histoseg.config import SegmentConfig
from histoseg.distributed import ClusterSpec
from histoseg.distributed.cluster import open_runner
from histoseg.distributed.lazy import LazyRunner
from histoseg.distributed.runner import InProcessRunner
from histoseg.errors import ConfigError, HistosegError
from histoseg.pipeline import segment_slide
from histoseg.pipeline.resume import STORE_DIR

from .oracle import OraclePredictor
from .synthetic import random_nuclei, write_slide


class _Recorder:
    """A start function that records who called it and can be held until released."""

    def __init__(self, *, hold: bool = False, error: Exception | None = None) -> None:
        self.threads: list[str] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        self.closed: list[InProcessRunner] = []
        self.error = error
        if not hold:
            self.release.set()

    def __call__(self) -> InProcessRunner:
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        self.release.wait(10)
        if self.error is not None:
            raise self.error
        recorder = self

        class Closing(InProcessRunner):
            def close(self) -> None:
                recorder.closed.append(self)
                super().close()

        return Closing()


def test_prestart_returns_at_once_and_the_first_request_waits_for_that_start() -> None:
    rec = _Recorder(hold=True)
    lazy = LazyRunner(rec)
    lazy.prestart(range(10))  # returns while the start is held
    assert rec.entered.wait(10) and not lazy.started
    lazy.prestart(range(10))  # already starting: no second start
    got: list[object] = []
    asker = threading.Thread(target=lambda: got.append(lazy.runner()))
    asker.start()
    asker.join(0.2)
    assert asker.is_alive() and not got  # the request waits for the start under way ...
    rec.release.set()
    asker.join(10)
    assert got and got[0] is lazy.runner()  # ... and gets the runner it started
    assert rec.threads == ["histoseg-prestart"]
    assert [r for _, r in lazy.imap_unordered(lambda x: x * 3, [1, 2])] == [3, 6]
    lazy.close()
    assert len(rec.closed) == 1


def test_a_failed_background_start_is_raised_by_the_first_request_and_never_retried() -> None:
    rec = _Recorder(error=ConfigError("no such queue"))
    lazy = LazyRunner(rec)
    lazy.prestart(range(5))
    for _ in range(2):
        with pytest.raises(ConfigError, match="no such queue"):
            lazy.runner()
    lazy.prestart(range(5))
    assert rec.threads == ["histoseg-prestart"]


def test_close_waits_for_a_start_under_way_and_closes_what_it_started() -> None:
    rec = _Recorder(hold=True)
    lazy = LazyRunner(rec)
    lazy.prestart(range(5))
    assert rec.entered.wait(10)
    closer = threading.Thread(target=lazy.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # waits for the start ...
    rec.release.set()
    closer.join(10)
    assert len(rec.closed) == 1  # ... then closes the runner it gave: nothing is left running
    with pytest.raises(HistosegError, match="closed"):
        lazy.runner()
    lazy.prestart(range(5))  # closed: nothing starts
    assert rec.threads == ["histoseg-prestart"]


def test_prestart_leaves_in_process_runners_to_the_thread_that_runs_their_tasks() -> None:
    """An in-process runner sets torch's and OpenCV's thread counts as it starts, and OpenMP keeps them per thread:
    started in the background, ``--workers 1`` ran on two threads (1.5 cores of CPU time on the 10000² slide). So
    neither ``--workers 1`` nor the small runner of a few tasks starts ahead; worker processes do."""
    big, small = _Recorder(), _Recorder()
    lazy = LazyRunner(big, small=small, small_below=4)
    lazy.prestart(range(3))  # the small runner would be chosen: left to the first request
    assert not lazy.started and small.threads == [] and big.threads == []
    lazy.runner(3)
    assert small.threads == [threading.current_thread().name] and big.threads == []
    lazy.close()
    one = open_runner(ClusterSpec(workers=1), lazy=True)
    assert isinstance(one, LazyRunner)
    one.prestart(range(100))
    assert not one.started and "histoseg-prestart" not in [t.name for t in threading.enumerate()]
    assert isinstance(one.runner(100), InProcessRunner)
    one.close()


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, OraclePredictor]:
    labels = random_nuclei((300, 300), 60, seed=7)
    path = write_slide(tmp_path_factory.mktemp("prestart") / "s.tif", labels, 0.5)
    return path, OraclePredictor(labels, 0.5)


class _Asked(LazyRunner):
    """A lazy runner that records the slide's requests to start ahead (the start itself may come from either thread:
    which one first takes the lock is the scheduler's choice, not the pipeline's)."""

    def __init__(self, start: _Recorder) -> None:
        super().__init__(start)
        self.asked: list[int] = []

    def prestart(self, items: Sequence[Any]) -> None:
        self.asked.append(len(items))
        super().prestart(items)


@pytest.mark.parametrize("interrupted", [False, True])
def test_segment_starts_the_workers_ahead_unless_stored_regions_may_be_reused(
    slide: tuple[Path, OraclePredictor], tmp_path: Path, interrupted: bool
) -> None:
    """A fresh slide asks for its runner ahead, before adaptation, for all its regions; a slide folder holding an
    interrupted run's regions does not (they may all be stored: then no cluster starts). One start either way."""
    path, oracle = slide
    if interrupted:
        (tmp_path / "s" / STORE_DIR).mkdir(parents=True)
    rec = _Recorder()
    with _Asked(rec) as lazy:
        rep = segment_slide(
            path,
            tmp_path,
            SegmentConfig(region_size=128, report=False, formats=("parquet",)),
            lazy,
            predictor=oracle,  # type: ignore[arg-type]
        )
    assert rep.status == "ok" and rep.nuclei > 20
    assert lazy.asked == ([] if interrupted else [rep.regions]) and rep.regions > 1
    assert len(rec.threads) == 1 and len(rec.closed) == 1
