"""Pipelined batches: slides that overlap give the same outputs and the same progress story as a batch
run one slide after another; a lazily started runner asked from two threads starts once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from histoseg.config import SegmentConfig
from histoseg.distributed.lazy import LazyRunner
from histoseg.distributed.runner import InProcessRunner
from histoseg.errors import HistosegError
from histoseg.pipeline import segment_batch

from .oracle import OraclePredictor
from .synthetic import random_nuclei, write_slide

SIZES = ((260, 300), (300, 380), (220, 260))  # (H, W) of the three slides: crops of one label plane


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], OraclePredictor]:
    root = tmp_path_factory.mktemp("pipeline")
    labels = random_nuclei((300, 380), 120, seed=4)
    paths = [str(write_slide(root / f"s{i}.tif", labels[:h, :w].copy(), 0.5)) for i, (h, w) in enumerate(SIZES)]
    return paths, OraclePredictor(labels, 0.5)


def _run(inputs: list[str], out: Path, oracle: OraclePredictor, lookahead: int) -> tuple[list[object], list[tuple]]:
    events: list[tuple] = []
    reports = segment_batch(
        inputs,
        out,
        SegmentConfig(region_size=128, report=False, formats=("geojson", "parquet")),
        runner=InProcessRunner(),
        predictor=oracle,  # type: ignore[arg-type]
        on_slide_start=lambda p, i, n: events.append(("start", Path(p).name, i, n)),
        on_region=lambda done, total: events.append(("region", done, total)),
        on_slide_done=lambda rep: events.append(("done", Path(rep.slide).name, rep.status)),
        lookahead=lookahead,
    )
    return list(reports), events


def _story(events: list[tuple]) -> list[tuple]:
    """Starts and ends in order, each slide's last region count (the counts in between may be merged)."""
    out: list[tuple] = []
    for e in events:
        if e[0] == "region" and out and out[-1][0] == "region":
            out[-1] = e
        else:
            out.append(e)
    return out


def test_pipelined_batch_matches_one_after_another(batch: tuple[list[str], OraclePredictor], tmp_path: Path) -> None:
    paths, oracle = batch
    twin = tmp_path / "other" / "s1.tif"  # another file with s1's output name: fails, as in input order
    twin.parent.mkdir()
    twin.write_bytes(Path(paths[1]).read_bytes())
    inputs = [*paths, str(tmp_path / "missing.tif"), str(twin)]
    seq, seq_events = _run(inputs, tmp_path / "seq", oracle, lookahead=0)
    pipe, pipe_events = _run(inputs, tmp_path / "pipe", oracle, lookahead=2)
    assert [(r.slide, r.status, r.nuclei, r.message) for r in seq] == [  # type: ignore[attr-defined]
        (r.slide, r.status, r.nuclei, r.message)  # type: ignore[attr-defined]
        for r in pipe
    ]
    assert [r.status for r in pipe] == ["ok", "ok", "ok", "failed", "failed"]  # type: ignore[attr-defined]
    nuclei = [r.nuclei for r in pipe[:3]]  # type: ignore[attr-defined]
    assert len(set(nuclei)) == 3 and min(nuclei) > 20  # three different slides, each with its own nuclei
    for i in range(3):
        a, b = tmp_path / "seq" / f"s{i}", tmp_path / "pipe" / f"s{i}"
        assert (a / f"s{i}.geojson").read_bytes() == (b / f"s{i}.geojson").read_bytes()
        assert pq.read_table(a / f"s{i}.nuclei.parquet").equals(pq.read_table(b / f"s{i}.nuclei.parquet"))
    # the caller sees one slide at a time, in input order, each ending at its full region count
    assert _story(seq_events) == _story(pipe_events)
    starts = [e for e in pipe_events if e[0] in ("start", "done")]
    assert [e[0] for e in starts] == ["start", "done"] * len(inputs)
    assert [e[2] for e in pipe_events if e[0] == "start"] == list(range(len(inputs)))
    for e in _story(pipe_events):
        if e[0] == "region":
            assert e[1] == e[2]


def test_lazy_runner_starts_once_from_two_threads() -> None:
    starts: list[int] = []

    def start() -> InProcessRunner:
        starts.append(1)
        time.sleep(0.2)  # long enough for the second thread to ask while the first is starting
        return InProcessRunner()

    lazy = LazyRunner(start)
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(lazy.runner())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(starts) == 1 and got[0] is got[1]
    assert np.array_equal([r for _, r in lazy.imap_unordered(lambda x: x * 2, [1, 2])], [2, 4])


def test_a_closed_lazy_runner_never_starts_again() -> None:
    """After an interrupt the batch closes its runner; a look-ahead slide still running must not start a second
    cluster, so every later request raises (one start in all)."""
    starts: list[int] = []

    def start() -> InProcessRunner:
        starts.append(1)
        return InProcessRunner()

    lazy = LazyRunner(start)
    assert [r for _, r in lazy.imap_unordered(lambda x: x + 1, [1])] == [2]
    lazy.close()
    with pytest.raises(HistosegError, match="closed"):
        lazy.runner()
    with pytest.raises(HistosegError, match="closed"):
        lazy.imap_unordered(lambda x: x, [1])
    never = LazyRunner(start)
    never.close()  # closed before any task: nothing was started, nothing will be
    with pytest.raises(HistosegError, match="closed"):
        never.runner()
    assert len(starts) == 1
