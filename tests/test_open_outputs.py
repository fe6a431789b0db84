"""The slide's writers open beside the adaptation (``pipeline.stitched.opening_in_background``): the block runs
while they open, the files equal those of opening first, and a failure on either side leaves nothing behind."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from histoseg.config import SegmentConfig
from histoseg.distributed import InProcessRunner
from histoseg.errors import HistosegError, OutputError
from histoseg.pipeline import segment_slide
from histoseg.pipeline.plan import SlidePlan, plan_slide
from histoseg.pipeline.slide import run_plan
from histoseg.pipeline.stitched import BandExport, RegionTables, opening_in_background

from .oracle import OraclePredictor
from .synthetic import random_nuclei, write_slide

MPP = 0.5
CFG = SegmentConfig(region_size=256, min_nucleus_area_um2=0.5, formats=("geojson", "zarr", "parquet"))


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    labels = random_nuclei((600, 700), 500, seed=5)
    return write_slide(tmp_path_factory.mktemp("slide") / "synth.tif", labels, MPP), labels


def _tables(plan: SlidePlan, oracle: OraclePredictor) -> RegionTables:
    tables = RegionTables(plan, None)
    with InProcessRunner() as runner:
        run_plan(plan, runner, oracle, tables=tables)
    return tables


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_block_runs_while_the_writers_open_and_the_files_are_the_same(
    slide: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    path, labels = slide
    oracle = OraclePredictor(labels, MPP)
    plan = plan_slide(path, CFG, oracle)
    (tmp_path / "first").mkdir()
    with BandExport(plan, _tables(plan, oracle), tmp_path / "first", "s", CFG, "key") as out:
        for r in plan.regions:
            out.region_done(r)

    block_ran = threading.Event()
    opened_in: list[str] = []

    class Gated(BandExport):
        """Opens only once the block has run: opened one after the other, this would never finish."""

        def __enter__(self) -> BandExport:
            assert block_ran.wait(60), "the block did not run while the writers were opening"
            opened_in.append(threading.current_thread().name)
            return super().__enter__()

    (tmp_path / "beside").mkdir()
    with opening_in_background(Gated(plan, _tables(plan, oracle), tmp_path / "beside", "s", CFG, "key")) as opening:
        block_ran.set()  # e.g. the adaptation
        for r in plan.regions:
            opening.result().region_done(r)
        assert not (tmp_path / "beside" / "s.geojson").exists()  # nothing appears before the block ends
    assert opened_in and opened_in[0] != threading.current_thread().name
    assert opening.result().nuclei == out.nuclei > 100
    first, beside = _files(tmp_path / "first"), _files(tmp_path / "beside")
    assert set(beside) == set(first) and {"s.geojson", "s.nuclei.parquet"} <= set(first)
    assert beside == first


def test_a_failing_block_or_opening_leaves_nothing(slide: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, labels = slide
    oracle = OraclePredictor(labels, MPP)
    plan = plan_slide(path, CFG, oracle)
    tables = _tables(plan, oracle)

    (tmp_path / "block").mkdir()  # the block fails (e.g. the adaptation) once the writers began to open
    with pytest.raises(RuntimeError, match="adaptation broke"):
        with opening_in_background(BandExport(plan, tables, tmp_path / "block", "s", CFG, "key")) as opening:
            raise RuntimeError("adaptation broke")
    assert opening.done() and list((tmp_path / "block").iterdir()) == []

    from histoseg.export import LabelZarrWriter

    def unopenable(self: LabelZarrWriter) -> LabelZarrWriter:  # the GeoJSON writer is open (a temporary) by now
        raise OutputError("s.zarr: disk full")

    for waits in (False, True):  # the block never asks for the writers / asks for them
        folder = tmp_path / f"open{int(waits)}"
        folder.mkdir()
        ran = []
        with pytest.MonkeyPatch.context() as mp, pytest.raises(OutputError, match="disk full"):
            mp.setattr(LabelZarrWriter, "__enter__", unopenable)
            with opening_in_background(BandExport(plan, tables, folder, "s", CFG, "key")) as opening:
                ran.append(1)
                if waits:
                    opening.result()
                    ran.append(2)
        assert ran == [1] and list(folder.iterdir()) == []


def test_segment_writes_nothing_when_adaptation_fails_beside_the_opening(
    slide: tuple[Path, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through ``segment_slide``: the writers are opening when the adaptation fails; the slide's folder keeps no
    output and no temporary file, and a second run writes every output."""
    import histoseg.pipeline.slide as slide_module

    path, labels = slide
    oracle = OraclePredictor(labels, MPP)
    real = slide_module.adapt_slide

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise HistosegError("adaptation broke")

    monkeypatch.setattr(slide_module, "adapt_slide", broken)
    with InProcessRunner() as runner, pytest.raises(HistosegError, match="adaptation broke"):
        segment_slide(path, tmp_path, CFG, runner, oracle)
    left = {p.name for p in (tmp_path / "synth").iterdir()}
    assert not any(n.startswith(".") or "geojson" in n or "zarr" in n or "parquet" in n for n in left), left

    monkeypatch.setattr(slide_module, "adapt_slide", real)
    with InProcessRunner() as runner:
        report = segment_slide(path, tmp_path, CFG, runner, oracle)
    assert report.status == "ok" and report.nuclei > 100
    names = {p.name for p in (tmp_path / "synth").iterdir()}
    assert {"synth.geojson", "synth.zarr", "synth.nuclei.parquet", "_SUCCESS"} <= names
