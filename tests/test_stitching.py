"""The stitching rule holds: region size does not change the instance set (design.md section 4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from histoseg.config import SegmentConfig
from histoseg.distributed import InProcessRunner
from histoseg.errors import HaloTooSmallError
from histoseg.metrics import aji
from histoseg.pipeline import segment_slide
from histoseg.pipeline.slide import run_regions_table
from histoseg.stitching import stitch
from histoseg.types import COLUMNS, Box, InstanceTable, PlaneInfo, Region

from .oracle import OraclePredictor
from .synthetic import random_nuclei, write_slide

MPP = 0.5
PLANE = PlaneInfo(("tumor",), ((255, 0, 0),), 0.25, 2.0, (64, 64))


def _instance_set(t: InstanceTable) -> set[frozenset[tuple[int, int]]]:
    out = set()
    for m, (oy, ox) in zip(t.masks, t.mask_offsets, strict=True):
        ys, xs = np.nonzero(m)
        out.add(frozenset(zip((ys + oy).tolist(), (xs + ox).tolist(), strict=True)))
    return out


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    labels = random_nuclei((900, 1100), 1400, seed=3)
    path = write_slide(tmp_path_factory.mktemp("slide") / "synth.tif", labels, MPP)
    labels[:, int(1100 * 0.85) :] = 0
    return path, labels


def _run(path: Path, labels: np.ndarray, region: int, **kw: object) -> InstanceTable:
    oracle = OraclePredictor(labels, MPP, **kw)  # type: ignore[arg-type]
    cfg = SegmentConfig(region_size=region, min_nucleus_area_um2=0.5)
    with InProcessRunner() as runner:
        return run_regions_table(path, cfg, runner, oracle)


def test_same_instances_for_two_region_sizes_and_one_pass(slide: tuple[Path, np.ndarray]) -> None:
    path, labels = slide
    a = _run(path, labels, 256)
    b = _run(path, labels, 416)
    whole = _run(path, labels, 2048)
    sa, sb, sw = _instance_set(a), _instance_set(b), _instance_set(whole)
    assert len(sw) > 600
    assert sa == sw
    assert sb == sw
    # ids: 1..N in the plane's raster order of anchors, never twice, and the same nucleus gets the same id
    # and bit-identical centroid whatever the region size
    assert a.ids.tolist() == list(range(1, len(a) + 1))
    for t in (a, b):
        np.testing.assert_array_equal(t.ids, whole.ids)
        np.testing.assert_array_equal(t.centroids, whole.centroids)
        np.testing.assert_array_equal(t.anchors, whole.anchors)
    # the oracle's ground truth itself is recovered from its ideal maps
    pred = np.zeros_like(labels)
    for i, m, (oy, ox) in zip(whole.ids, whole.masks, whole.mask_offsets, strict=True):
        pred[oy : oy + m.shape[0], ox : ox + m.shape[1]][m] = i
    assert aji(labels, pred) > 0.95


def test_ids_do_not_depend_on_task_order(slide: tuple[Path, np.ndarray]) -> None:
    path, labels = slide

    class Reversed(InProcessRunner):
        def imap_unordered(self, fn, items, *args):  # type: ignore[no-untyped-def]
            for i in reversed(range(len(items))):
                yield i, fn(items[i], *args)

    oracle = OraclePredictor(labels, MPP)
    cfg = SegmentConfig(region_size=256, min_nucleus_area_um2=0.5)
    fwd = run_regions_table(path, cfg, InProcessRunner(), oracle)
    rev = run_regions_table(path, cfg, Reversed(), oracle)
    np.testing.assert_array_equal(fwd.ids, rev.ids)
    np.testing.assert_array_equal(fwd.centroids, rev.centroids)


def test_nucleus_larger_than_halo_is_reported_not_cut(tmp_path: Path) -> None:
    labels = np.zeros((512, 512), np.int32)
    yy, xx = np.indices(labels.shape)
    labels[(yy - 256) ** 2 + ((xx - 250) / 3.0) ** 2 <= 20**2] = 1  # 120 px wide, crosses a region border
    path = write_slide(tmp_path / "big.tif", np.pad(labels, ((0, 0), (0, 100))), MPP)
    # the card claims nuclei are at most 5 µm: halo 16 px, far smaller than this 60 µm nucleus
    table = _run(path, np.pad(labels, ((0, 0), (0, 100))), 256, max_nucleus_um=5.0)
    assert table.edge_touching >= 1
    oracle = OraclePredictor(np.pad(labels, ((0, 0), (0, 100))), MPP, max_nucleus_um=5.0)
    cfg = SegmentConfig(region_size=256, strict_halo=True, min_nucleus_area_um2=0.5)
    with pytest.raises(HaloTooSmallError, match="halo"):
        segment_slide(path, tmp_path / "out", cfg, InProcessRunner(), oracle)


def test_dask_workers_give_the_same_table(slide: tuple[Path, np.ndarray]) -> None:
    from histoseg.distributed import local_dask_runner

    path, labels = slide
    oracle = OraclePredictor(labels, MPP)
    cfg = SegmentConfig(region_size=256, min_nucleus_area_um2=0.5)
    ref = run_regions_table(path, cfg, InProcessRunner(), oracle)
    with local_dask_runner(2) as runner:
        got = run_regions_table(path, cfg, runner, oracle)
    np.testing.assert_array_equal(ref.ids, got.ids)
    np.testing.assert_array_equal(ref.centroids, got.centroids)
    assert _instance_set(ref) == _instance_set(got)


def _table(anchors: list[tuple[int, int]], edge: int = 0) -> InstanceTable:
    """A region table whose nucleus k is a (k+1) x 1 mask at its anchor; measurement ``m`` = anchor x."""
    n = len(anchors)
    a = np.array(anchors, np.int64).reshape(n, 2)
    return InstanceTable(
        ids=np.zeros(n, np.uint32),
        anchors=a,
        centroids=a[:, ::-1] * 2.0 + 1.0,
        bboxes=np.zeros((n, 4)),
        class_ids=np.ones(n, np.uint8),
        probabilities=np.full(n, 0.5, np.float32),
        polygons=[np.full((4, 2), float(k)) for k in range(n)],
        masks=[np.ones((k + 1, 1), bool) for k in range(n)],
        mask_offsets=a.copy(),
        measurements={"m": a[:, 1].astype(np.float64)},
        plane=PLANE,
        edge_touching=edge,
    )


def test_stitch_ranks_by_anchor_over_the_plane_and_keeps_dtypes() -> None:
    template = InstanceTable.empty(PLANE, ("m",))
    assert [(getattr(template, c.name).dtype, len(getattr(template, c.name))) for c in COLUMNS if not c.is_list] == [
        (np.dtype(c.dtype), 0) for c in COLUMNS if not c.is_list
    ]
    right = (Region(0, 1, Box(32, 0, 32, 64), 8), _table([(20, 40), (3, 50)], edge=2))
    left = (Region(0, 0, Box(0, 0, 32, 64), 8), _table([(10, 9), (10, 2), (1, 30)], edge=1))
    out = stitch([right, left], template)  # neither arrival order nor regions matter: the plane's raster order
    assert out.ids.tolist() == [1, 2, 3, 4, 5]
    assert out.anchors.tolist() == [[1, 30], [3, 50], [10, 2], [10, 9], [20, 40]]
    assert out.measurements["m"].tolist() == [30.0, 50.0, 2.0, 9.0, 40.0]
    assert [m.shape[0] for m in out.masks] == [3, 2, 2, 1, 1]  # masks travel with their rows
    assert [float(p[0, 0]) for p in out.polygons] == [2.0, 1.0, 1.0, 0.0, 0.0]
    assert out.edge_touching == 3 and out.plane == PLANE
    for c in COLUMNS:
        if not c.is_list:
            assert getattr(out, c.name).dtype == np.dtype(c.dtype), c.name
    none = stitch([(left[0], left[1].take(np.zeros(0, np.int64)))], template)
    assert len(none) == 0 and list(none.measurements) == ["m"] and none.edge_touching == 1


def test_finished_regions_wait_on_disk_and_stitch_band_by_band(slide: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    """With a region store the client holds no region's nuclei: they are read back one band at a time and
    give the same table as stitching everything in memory; a region file lost before stitching is an error."""
    from histoseg.errors import OutputError
    from histoseg.pipeline.plan import plan_slide
    from histoseg.pipeline.resume import RegionStore
    from histoseg.pipeline.slide import run_plan
    from histoseg.pipeline.stitched import stitch_all

    path, labels = slide
    oracle = OraclePredictor(labels, MPP)
    cfg = SegmentConfig(region_size=256, min_nucleus_area_um2=0.5)
    plan = plan_slide(path, cfg, oracle)
    assert len({r.row for r in plan.regions}) >= 3  # several bands
    store = RegionStore.open(tmp_path, {"test": "bands"})
    with InProcessRunner() as runner:
        outcome, tables = run_plan(plan, runner, oracle, store=store)
    assert tables._memory == {}  # noqa: SLF001 - what the client keeps is what is tested
    assert len(list(store.folder.glob("*.npz"))) == len(plan.regions) == outcome.regions_computed
    streamed = stitch_all(plan, tables, outcome)
    whole = _run(path, labels, 256)
    assert outcome.nuclei == len(streamed) == len(whole) > 600
    assert streamed.ids.tolist() == whole.ids.tolist()
    assert np.array_equal(streamed.centroids, whole.centroids) and np.array_equal(streamed.anchors, whole.anchors)
    assert _instance_set(streamed) == _instance_set(whole)
    store.path(plan.regions[len(plan.regions) // 2]).unlink()
    with pytest.raises(OutputError, match="run again to recompute it"):
        stitch_all(plan, tables, outcome)


def test_bands_are_written_while_later_regions_run(slide: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    """BandExport writes a band as soon as it and every band above it are finished (the export runs beside
    the region tasks), whatever order regions finish in; the files equal those of writing after every region
    is done; a region never finished leaves no output at all."""
    from histoseg.errors import OutputError
    from histoseg.pipeline.plan import plan_slide
    from histoseg.pipeline.slide import run_plan
    from histoseg.pipeline.stitched import BandExport, RegionTables
    from histoseg.stitching import bands

    path, labels = slide
    oracle = OraclePredictor(labels, MPP)
    cfg = SegmentConfig(region_size=256, min_nucleus_area_um2=0.5, formats=("geojson", "parquet"))
    plan = plan_slide(path, cfg, oracle)
    rows = list(bands(plan.regions))
    assert len(rows) >= 3

    def outputs_of(order: list[int], folder: Path) -> list[int]:
        """Regions handed in ``order``; the bands written after each hand-in."""
        folder.mkdir()
        tables = RegionTables(plan, None)
        with InProcessRunner() as runner:
            run_plan(plan, runner, oracle, tables=tables)
        written = []
        with BandExport(plan, tables, folder, "s", cfg, "key") as out:
            for i in order:
                out.region_done(plan.regions[i])
                written.append(out._next)  # noqa: SLF001 - the bands written so far is what is tested
            assert not (folder / "s.geojson").exists()  # nothing appears before the block ends
        assert out.nuclei > 600
        return written

    n = len(plan.regions)
    first_band = len(rows[0])
    in_order = outputs_of(list(range(n)), tmp_path / "a")
    assert in_order[first_band - 1] == 1 and in_order[-1] == len(rows)  # band 0 written with its last region
    backwards = outputs_of(list(range(n))[::-1], tmp_path / "b")
    assert backwards[:-1] == [0] * (n - 1) and backwards[-1] == len(rows)  # nothing until the top band is done
    assert (tmp_path / "a" / "s.geojson").read_bytes() == (tmp_path / "b" / "s.geojson").read_bytes()
    assert (tmp_path / "a" / "s.nuclei.parquet").read_bytes() == (tmp_path / "b" / "s.nuclei.parquet").read_bytes()
    import pyarrow.parquet as pq

    from histoseg.pipeline.plan import PlanOutcome
    from histoseg.pipeline.stitched import stitch_all

    whole_tables = RegionTables(plan, None)
    with InProcessRunner() as runner:
        run_plan(plan, runner, oracle, tables=whole_tables)
    whole = stitch_all(plan, whole_tables, PlanOutcome({}))  # everything at once, in memory
    written = pq.read_table(tmp_path / "a" / "s.nuclei.parquet")
    assert written.column("id").to_pylist() == whole.ids.tolist()
    assert np.array_equal(written.column("centroid_x").to_numpy(), whole.centroids[:, 0])

    (tmp_path / "c").mkdir()
    tables = RegionTables(plan, None)
    with InProcessRunner() as runner:
        run_plan(plan, runner, oracle, tables=tables)
    with pytest.raises(OutputError, match="never finished"):
        with BandExport(plan, tables, tmp_path / "c", "s", cfg, "key") as out:
            for r in plan.regions[:-1]:
                out.region_done(r)
    assert list((tmp_path / "c").iterdir()) == []

    # a writer that fails while a band is written, in the middle of the regions: nothing appears either
    from histoseg.export import ParquetTableWriter

    (tmp_path / "d").mkdir()
    tables = RegionTables(plan, None)
    with InProcessRunner() as runner:
        run_plan(plan, runner, oracle, tables=tables)
    calls = []

    def failing_write(self: ParquetTableWriter, table: object, polygons: object = None) -> int:
        calls.append(1)
        raise OSError("disk full")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ParquetTableWriter, "write", failing_write)
        with pytest.raises(OutputError, match="disk full"):  # the atomic writer names the file
            with BandExport(plan, tables, tmp_path / "d", "s", cfg, "key") as out:
                for r in plan.regions:
                    out.region_done(r)
    assert calls == [1] and list((tmp_path / "d").iterdir()) == []
