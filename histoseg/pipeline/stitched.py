"""A slide's finished regions, stitched and written band by band, so memory stays flat in slide size.

Region results wait in the slide's region store on disk (:mod:`histoseg.pipeline.resume`), not in memory;
without a store (a predictor that cannot be identified) they wait in memory. As soon as a band (row of
regions) and every band above it are done, its regions are read back, top to bottom, while later regions
still run (:class:`BandExport`): the band's nuclei get their global ids
(:class:`~histoseg.stitching.BandStitcher`) and go to every output writer, which keeps only what a later
band can still change (the label raster's chunk rows within a halo of the next band).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from histoseg.config import SegmentConfig
from histoseg.distributed.runner import release_freed_memory
from histoseg.errors import OutputError
from histoseg.export import GeoJSONWriter, LabelZarrWriter, ParquetTableWriter, RepairStats, SlideImage
from histoseg.export.gcpause import gc_paused
from histoseg.export.geometry import clean_polygons
from histoseg.pipeline.plan import PlanOutcome, SlidePlan
from histoseg.pipeline.resume import RegionStore
from histoseg.postprocess import MEASUREMENTS
from histoseg.stitching import BandStitcher, bands, in_tissue
from histoseg.tiling import TISSUE_CELL
from histoseg.types import InstanceTable, Region


class RegionTables:
    """The owned-nucleus tables of a slide's finished regions until they are stitched: in ``store`` (on disk)
    when there is one, else in memory. Each table is handed out once."""

    def __init__(self, plan: SlidePlan, store: RegionStore | None) -> None:
        self.plan = plan
        self.store = store
        self._memory: dict[str, InstanceTable] = {}

    def use_store(self, store: RegionStore | None) -> None:
        """Keep the tables in ``store`` from now on: a slide's store is known only once its predictor is final
        (adapted, calibrated: they are part of its settings), after the writers began to open
        (:func:`opening_in_background`). Set before the first table is added."""
        if self._memory:
            raise RuntimeError("RegionTables.use_store after tables were added")
        self.store = store

    def add(self, region: Region, table: InstanceTable) -> None:
        """Keep ``region``'s table (saved to the store as it arrives: a killed run resumes from it)."""
        if self.store is not None:
            self.store.save(region, table)
        else:
            self._memory[region.key] = table

    def take(self, region: Region) -> InstanceTable:
        """``region``'s table, read back from the store (or taken from memory); raises OutputError if it is gone."""
        if region.key in self._memory:
            return self._memory.pop(region.key)
        table = self.store.load(region, self.plan.spec.plane) if self.store is not None else None
        if table is None:
            raise OutputError(
                f"{self.plan.path.name}: the stored result of region {region.key} disappeared or was damaged "
                "before the slide was stitched; run again to recompute it"
            )
        return table


def stitch_band(
    plan: SlidePlan, tables: RegionTables, stitcher: BandStitcher, band: list[Region]
) -> tuple[InstanceTable, int]:
    """One band's nuclei with their global ids, and the plane row above which no later band has a mask pixel
    (a region's masks lie in its read box: at most the halo above its core)."""
    owned = []
    for region in band:
        t = tables.take(region)
        # a nucleus counts only when its anchor lies in a tissue cell: a grid fixed by the slide, not the regions
        owned.append(t.take(np.flatnonzero(in_tissue(t.anchors, plan.cells, TISSUE_CELL))))
    return stitcher.band(owned), band[0].core.y1 - plan.halo


def stitched_bands(
    plan: SlidePlan, tables: RegionTables, stitcher: BandStitcher
) -> Iterator[tuple[InstanceTable, int]]:
    """The slide's nuclei band by band (:func:`stitch_band`), top to bottom."""
    for band in bands(plan.regions):
        yield stitch_band(plan, tables, stitcher, band)


def template(plan: SlidePlan) -> InstanceTable:
    """An empty table of the slide: its plane and the measurement columns of every region's table."""
    return InstanceTable.empty(plan.spec.plane, MEASUREMENTS)


def stitch_all(plan: SlidePlan, tables: RegionTables, outcome: PlanOutcome) -> InstanceTable:
    """The whole slide's stitched table in memory (tests, notebooks); fills ``outcome``'s counts."""
    stitcher = BandStitcher(template(plan))
    parts = [band for band, _ in stitched_bands(plan, tables, stitcher)]
    outcome.nuclei, outcome.edge_touching = stitcher.nuclei, stitcher.edge_touching
    return InstanceTable.concat([stitcher.template, *parts])


class BandExport:
    """The slide's output writers, open while its regions run: each band is stitched and written as soon as
    its regions and every band above it are finished (:meth:`region_done`), so the export runs beside the
    region tasks instead of after them, while the workers would idle (issue 13). Bands go out in the same
    order, top to bottom, as when every region is finished first: the outputs are identical.

    Use as a context manager: every file or folder appears atomically when the block ends without an
    exception, and not at all otherwise. ``nuclei``, ``edge_touching`` and the ``stitch`` and ``export``
    seconds are known once it has ended."""

    def __init__(
        self, plan: SlidePlan, tables: RegionTables, out_dir: Path, stem: str, config: SegmentConfig, slide_key: str
    ) -> None:
        self.plan, self.tables, self.out_dir, self.stem = plan, tables, out_dir, stem
        self.config, self.slide_key = config, slide_key
        self.stitcher = BandStitcher(template(plan))
        self.stats = RepairStats()
        self.stitch_s = self.export_s = 0.0
        self.nuclei = self.edge_touching = 0
        self._bands = list(bands(plan.regions))
        self._next = 0  # the first band not written yet
        self._done: set[str] = set()
        self._stack = contextlib.ExitStack()
        self._writers: dict[str, Any] = {}

    def __enter__(self) -> BandExport:
        t0 = time.perf_counter()
        out_dir, stem, config = self.out_dir, self.stem, self.config
        with contextlib.ExitStack() as stack:
            if "geojson" in config.formats:
                path = out_dir / f"{stem}.geojson"
                geo = GeoJSONWriter(path, slide_key=self.slide_key, gzip=config.geojson_gzip)
                self._writers["geojson"] = stack.enter_context(geo)
            if "zarr" in config.formats:
                image = SlideImage(self.plan.path, backend=config.backend, slide_mpp=config.slide_mpp)
                zarr_writer = LabelZarrWriter(
                    out_dir / f"{stem}.zarr", self.plan.spec.plane, image=image, chunk=config.region_size
                )
                self._writers["zarr"] = stack.enter_context(zarr_writer)
            if "parquet" in config.formats:
                path = out_dir / f"{stem}.nuclei.parquet"
                self._writers["parquet"] = stack.enter_context(ParquetTableWriter(path, self.stitcher.template))
            self._stack = stack.pop_all()
        # the root image's reading and compression (zarr's threads) leave freed memory in the allocator's arenas:
        # handed back here, it is not held beside the workers all through the regions (~80 MB, issue 13)
        release_freed_memory()
        self.export_s += time.perf_counter() - t0
        return self

    def region_done(self, region: Region) -> None:
        """``region``'s table is in ``tables``: write every band that is now complete, top to bottom."""
        self._done.add(region.key)
        while self._next < len(self._bands) and all(r.key in self._done for r in self._bands[self._next]):
            self._write_band(self._bands[self._next])
            self._next += 1

    def _write_band(self, band: list[Region]) -> None:
        with gc_paused():  # the band's outputs are millions of small objects (histoseg.export.gcpause)
            self._write_band_now(band)

    def _write_band_now(self, band: list[Region]) -> None:
        t0 = time.perf_counter()
        table, final_above = stitch_band(self.plan, self.tables, self.stitcher, band)
        t1 = time.perf_counter()
        self.stitch_s += t1 - t0
        writers = self._writers
        polygons = clean_polygons(table, self.stats) if "geojson" in writers or "parquet" in writers else None
        for name, writer in writers.items():
            if name == "zarr":
                writer.write(table, final_above)
            else:
                writer.write(table, polygons)
        self.export_s += time.perf_counter() - t1

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        stack, self._stack = self._stack, contextlib.ExitStack()
        if exc_type is not None:  # every writer removes its temporary output; nothing appears
            stack.__exit__(exc_type, exc, tb)
            return
        if self._next < len(self._bands):
            missing = sum(r.key not in self._done for band in self._bands[self._next :] for r in band)
            err = OutputError(f"{self.plan.path.name}: {missing} region(s) were never finished; nothing was written")
            stack.__exit__(OutputError, err, None)
            raise err
        t0 = time.perf_counter()
        with stack:  # closing: the label pyramid's lower levels, the renames into place
            pass
        self.export_s += time.perf_counter() - t0
        names = ", ".join(n for n in ("geojson", "parquet") if n in self._writers)
        self.stats.log(f"{self.stem} polygons ({names})")
        self.nuclei, self.edge_touching = self.stitcher.nuclei, self.stitcher.edge_touching

    def fill(self, outcome: PlanOutcome) -> None:
        """Put the counts and the ``stitch`` and ``export`` seconds into ``outcome`` (after the block)."""
        outcome.nuclei, outcome.edge_touching = self.nuclei, self.edge_touching
        outcome.timings["stitch"] = self.stitch_s
        outcome.timings["export"] = self.export_s


@contextlib.contextmanager
def opening_in_background(export: BandExport) -> Iterator[Future[BandExport]]:
    """Open ``export``'s writers in a background thread while the block goes on; yield the opening's future.

    Opening writes the Zarr root image (the whole slide read and compressed: 2.7 s of a 10000² slide on a 2-core
    AMD EPYC), which needs nothing of the network; the block adapts and calibrates the network and quantises
    its engine meanwhile (4.4 s there), while the workers wait for that engine: both are serial time before the
    first region, so they run side by side on cores that would idle (measured there: regions start ~1-4 s sooner,
    less than the 2.7 s because the two share the cores with the workers' start; issue 13).
    Whoever writes a band waits for ``future.result()``. On leaving, the writers close as the ``with
    BandExport`` block would: committed when the block and the opening succeeded, removed otherwise."""
    with ThreadPoolExecutor(1, thread_name_prefix="histoseg-open-outputs") as pool:
        future = pool.submit(export.__enter__)
        try:
            yield future
        except BaseException as exc:
            if future.exception() is None:  # opened (waits for it): remove what it began
                export.__exit__(type(exc), exc, exc.__traceback__)
            raise
        future.result()  # the opening's own error, if the block never needed the writers
        export.__exit__(None, None, None)
