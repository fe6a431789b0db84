"""A slide's finished regions, stitched and written band by band, so memory stays flat in slide size.

Region results wait in the slide's region store on disk (:mod:`histoseg.pipeline.resume`), not in memory;
without a store (a predictor that cannot be identified) they wait in memory. Once every region is done,
the regions are read back one band (row of regions) at a time, top to bottom: each band's nuclei get their
global ids (:class:`~histoseg.stitching.BandStitcher`) and go to every output writer, which keeps only what
a later band can still change (the label raster's chunk rows within a halo of the next band).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from histoseg.config import SegmentConfig
from histoseg.errors import OutputError
from histoseg.export import GeoJSONWriter, LabelZarrWriter, ParquetTableWriter, RepairStats, SlideImage
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


def stitched_bands(
    plan: SlidePlan, tables: RegionTables, stitcher: BandStitcher
) -> Iterator[tuple[InstanceTable, int]]:
    """The slide's nuclei band by band with their global ids, each with the plane row above which no later
    band has a mask pixel (a region's masks lie in its read box: at most the halo above its core)."""
    for band in bands(plan.regions):
        owned = []
        for region in band:
            t = tables.take(region)
            # a nucleus counts only when its anchor lies in a tissue cell: a grid fixed by the slide, not the regions
            owned.append(t.take(np.flatnonzero(in_tissue(t.anchors, plan.cells, TISSUE_CELL))))
        yield stitcher.band(owned), band[0].core.y1 - plan.halo


def template(plan: SlidePlan) -> InstanceTable:
    """An empty table of the slide: its plane and the measurement columns of every region's table."""
    return InstanceTable.empty(plan.spec.plane, MEASUREMENTS)


def stitch_all(plan: SlidePlan, tables: RegionTables, outcome: PlanOutcome) -> InstanceTable:
    """The whole slide's stitched table in memory (tests, notebooks); fills ``outcome``'s counts."""
    stitcher = BandStitcher(template(plan))
    parts = [band for band, _ in stitched_bands(plan, tables, stitcher)]
    outcome.nuclei, outcome.edge_touching = stitcher.nuclei, stitcher.edge_touching
    return InstanceTable.concat([stitcher.template, *parts])


def write_outputs(
    plan: SlidePlan,
    tables: RegionTables,
    outcome: PlanOutcome,
    out_dir: Path,
    stem: str,
    config: SegmentConfig,
    slide_key: str,
) -> None:
    """Stitch the slide band by band into every format of ``config.formats``; each file or folder appears
    atomically once complete. Fills ``outcome``'s counts and its ``stitch`` and ``export`` timings."""
    stitcher = BandStitcher(template(plan))
    stats = RepairStats()
    stitch_s = export_s = 0.0
    with contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        writers: dict[str, Any] = {}
        if "geojson" in config.formats:
            path = out_dir / f"{stem}.geojson"
            writers["geojson"] = stack.enter_context(GeoJSONWriter(path, slide_key=slide_key, gzip=config.geojson_gzip))
        if "zarr" in config.formats:
            image = SlideImage(plan.path, backend=config.backend, slide_mpp=config.slide_mpp)
            zarr_writer = LabelZarrWriter(
                out_dir / f"{stem}.zarr", plan.spec.plane, image=image, chunk=config.region_size
            )
            writers["zarr"] = stack.enter_context(zarr_writer)
        if "parquet" in config.formats:
            path = out_dir / f"{stem}.nuclei.parquet"
            writers["parquet"] = stack.enter_context(ParquetTableWriter(path, stitcher.template))
        export_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        for band, final_above in stitched_bands(plan, tables, stitcher):
            t1 = time.perf_counter()
            stitch_s += t1 - t0
            polygons = clean_polygons(band, stats) if "geojson" in writers or "parquet" in writers else None
            for name, writer in writers.items():
                if name == "zarr":
                    writer.write(band, final_above)
                else:
                    writer.write(band, polygons)
            t0 = time.perf_counter()
            export_s += t0 - t1
        t0 = time.perf_counter()
    export_s += time.perf_counter() - t0  # closing: the label pyramid's lower levels, renames
    stats.log(f"{stem} polygons ({', '.join(n for n in ('geojson', 'parquet') if n in writers)})")
    outcome.nuclei, outcome.edge_touching = stitcher.nuclei, stitcher.edge_touching
    outcome.timings["stitch"] = stitch_s
    outcome.timings["export"] = export_s
