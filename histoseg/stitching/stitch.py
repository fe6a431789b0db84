"""Deterministic global ids (stitching rule 5) over the concatenation of per-region tables, band by band.

Ids rank every owned nucleus of the slide by (anchor y, anchor x), then mask origin, then area: a global
raster order of the plane, so they depend neither on the order in which tasks finished nor on the region
size (each nucleus has one owner, and its anchor, mask and area are the same whichever region owned it).

A row of regions (a *band*) owns exactly the anchors whose y lies in its cores' rows, so the slide's raster
order is the bands' order, each band sorted on its own: :class:`BandStitcher` numbers one band at a time,
and a slide is stitched and exported with one band's nuclei in memory, whatever its size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import groupby

import numpy as np

from histoseg.errors import HistosegError
from histoseg.types import InstanceTable, Region


def order_within_region(table: InstanceTable) -> np.ndarray:
    """Permutation sorting a table's instances by anchor (y, x), then mask origin, then area (used on a
    region's table and on a band's)."""
    if len(table) == 0:
        return np.zeros(0, np.int64)
    area = np.array([m.sum() for m in table.masks], dtype=np.int64)
    keys = (area, table.mask_offsets[:, 1], table.mask_offsets[:, 0], table.anchors[:, 1], table.anchors[:, 0])
    return np.lexsort(keys)


class BandStitcher:
    """Numbers the owned nuclei of a slide band after band (rows of regions, top to bottom).

    ``template`` (an empty table) supplies the plane and the measurement names, also for a band without
    nuclei. ``nuclei`` and ``edge_touching`` are the running totals over the bands stitched so far.
    """

    def __init__(self, template: InstanceTable) -> None:
        self.template = template
        self.nuclei = 0
        self.edge_touching = 0
        self._last_y = -1  # the last band's largest anchor y: a band must lie below it

    def band(self, tables: Sequence[InstanceTable]) -> InstanceTable:
        """The nuclei of one band (the owned tables of its regions, any order) with the next global ids."""
        out = InstanceTable.concat([self.template, *tables])
        out = out.take(order_within_region(out))
        if len(out):
            if int(out.anchors[0, 0]) <= self._last_y:
                raise HistosegError("bands must be stitched top to bottom, each below the previous one")
            self._last_y = int(out.anchors[-1, 0])
        out.ids = np.arange(self.nuclei + 1, self.nuclei + len(out) + 1, dtype=np.uint32)
        self.nuclei += len(out)
        self.edge_touching += out.edge_touching
        return out


def bands(regions: Iterable[Region]) -> Iterator[list[Region]]:
    """``regions`` grouped into bands (rows of regions), top to bottom, each band left to right."""
    ordered = sorted(regions, key=lambda r: (r.row, r.col))
    for _, group in groupby(ordered, key=lambda r: r.row):
        yield list(group)


def stitch(results: list[tuple[Region, InstanceTable]], template: InstanceTable) -> InstanceTable:
    """Concatenate owned instances of every region with global ids 1..N in the plane's raster order (rule 5);
    the whole slide in memory at once (tests, notebooks; the pipeline streams :class:`BandStitcher`'s bands).
    """
    tables = {r.key: t for r, t in results}
    stitcher = BandStitcher(template)
    parts = [stitcher.band([tables[r.key] for r in band]) for band in bands(r for r, _ in results)]
    return InstanceTable.concat([template, *parts]) if parts else stitcher.band([])
