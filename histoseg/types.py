"""Typed objects that travel along the data flow (design.md section 1).

Coordinate conventions, fixed once here:

* ``level-0`` coordinates are pixels of the full-resolution image as QuPath shows it, origin top-left.
* the *processing plane* is the slide resampled to the model's mpp; pixel ``(i, j)`` of the plane covers
  level-0 ``[j * scale, (j + 1) * scale) x [i * scale, (i + 1) * scale)`` where ``scale = mpp / mpp0``.
* boxes are half-open ``[x, x + w) x [y, y + h)``; arrays are indexed ``[y, x]``.

Class ids, fixed once here (:meth:`PlaneInfo.class_name` / :meth:`PlaneInfo.class_color`): id ``0``
is background / unclassified; id ``k >= 1`` is entry ``k - 1`` of the model card's class list (the card
numbers its classes from 1), so ``class_names`` and ``class_colors`` never contain the background.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BACKGROUND_NAME = "background"
BACKGROUND_COLOR = (0, 0, 0)
UNKNOWN_CLASS_COLOR = (128, 128, 128)
"""Colour of a class id past the model card's list (should not happen; kept visible, not transparent)."""


@dataclass(frozen=True)
class Box:
    """Half-open integer rectangle ``[x, x+w) x [y, y+h)``."""

    x: int
    y: int
    w: int
    h: int

    @property
    def x1(self) -> int:
        return self.x + self.w

    @property
    def y1(self) -> int:
        return self.y + self.h

    def contains(self, x: float, y: float) -> bool:
        """True when the point lies in the half-open box."""
        return self.x <= x < self.x1 and self.y <= y < self.y1

    def intersect(self, other: Box) -> Box | None:
        x0, y0 = max(self.x, other.x), max(self.y, other.y)
        x1, y1 = min(self.x1, other.x1), min(self.y1, other.y1)
        if x1 <= x0 or y1 <= y0:
            return None
        return Box(x0, y0, x1 - x0, y1 - y0)


@dataclass(frozen=True)
class SlideMeta:
    """What a reader knows about a slide; everything a pipeline needs without pixels."""

    path: str
    backend: str
    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height) per level
    level_downsamples: tuple[float, ...]
    mpp: float | None  # level-0 microns per pixel (None: unknown)
    objective_power: float | None = None
    bounds_offset: tuple[int, int] = (0, 0)  # OpenSlide bounds-x/y, informational: coordinates stay full-image
    mpp_source: str = "metadata"  # "metadata" | "user" | "none"
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)


@dataclass(frozen=True)
class Region:
    """One unit of work: a core box of the processing plane plus a halo on every side.

    ``core`` boxes of all regions partition the plane (stitching rule 1). ``tissue``, set by a tissue-aware
    plan, is the bounding box of the core's tissue cells: only nuclei anchored there can be kept (stitching
    rule 2), so the region owns that box (``owns``) and reads and runs the network on it grown by ``halo``
    (``read``, which may extend past the slide: padded with white). Without it the whole core is owned.
    The box lies on the fixed tissue-cell grid, so it never depends on the region size.
    """

    row: int
    col: int
    core: Box
    halo: int
    tissue: Box | None = None

    @property
    def owns(self) -> Box:
        """The box whose anchored nuclei this region keeps: ``tissue`` if set, else ``core``."""
        return self.tissue if self.tissue is not None else self.core

    @property
    def read(self) -> Box:
        o, h = self.owns, self.halo
        return Box(o.x - h, o.y - h, o.w + 2 * h, o.h + 2 * h)

    @property
    def key(self) -> str:
        return f"r{self.row:05d}_c{self.col:05d}"


@dataclass(frozen=True)
class PlaneInfo:
    """What every nucleus of one slide shares: the model card's classes and the processing plane.

    Decided once per slide by the plan and carried by its task spec, so region tasks do not recompute it
    and region files do not store it.
    """

    class_names: tuple[str, ...]
    class_colors: tuple[tuple[int, int, int], ...]
    mpp0: float  # level-0 microns per pixel
    scale: float  # level-0 pixels per processing-plane pixel
    plane_shape: tuple[int, int]  # (H, W) of the processing plane

    @property
    def mpp(self) -> float:
        """Processing-plane microns per pixel."""
        return self.mpp0 * self.scale

    def class_name(self, cid: int) -> str:
        """Name of class id ``cid``: the card's ``class_names[cid - 1]`` for ``cid >= 1``, ``"background"``
        for 0, ``"class <cid>"`` past the card's list. The one mapping every exporter uses."""
        cid = int(cid)
        if cid == 0:
            return BACKGROUND_NAME
        return self.class_names[cid - 1] if 1 <= cid <= len(self.class_names) else f"class {cid}"

    def class_color(self, cid: int) -> tuple[int, int, int]:
        """RGB of class id ``cid``: the card's ``class_colors[cid - 1]`` for ``cid >= 1``, black for 0
        (drawn transparent where a format has alpha), grey past the card's list."""
        cid = int(cid)
        if cid == 0:
            return BACKGROUND_COLOR
        if 1 <= cid <= len(self.class_colors):
            r, g, b = (int(v) for v in self.class_colors[cid - 1])
            return r, g, b
        return UNKNOWN_CLASS_COLOR


@dataclass(frozen=True)
class Column:
    """One per-nucleus column of :class:`InstanceTable`: attribute name, dtype and the shape of one
    nucleus's value (``None``: varies between nuclei). Fixed-shape columns are one array whose first axis
    is the nucleus; varying-shape ("list") columns are a list of arrays, one per nucleus."""

    name: str
    dtype: str
    shape: tuple[int | None, ...] = ()

    @property
    def is_list(self) -> bool:
        return None in self.shape


COLUMNS: tuple[Column, ...] = (
    Column("ids", "uint32"),  # 1-based global ids (0 until stitched)
    Column("anchors", "int64", (2,)),  # (y, x) plane pixels: floor of the plane centroid
    Column("centroids", "float64", (2,)),  # (x, y) level-0 pixels
    Column("bboxes", "float64", (4,)),  # (x0, y0, x1, y1) level-0 pixels
    Column("class_ids", "uint8"),  # 0 = unclassified, k >= 1 = class_names[k - 1] (see class_name)
    Column("probabilities", "float32"),  # mean probability of the assigned type (or NP)
    Column("polygons", "float64", (None, 2)),  # (x, y) level-0, no repeated closing vertex
    Column("masks", "bool", (None, None)),  # crops at processing resolution
    Column("mask_offsets", "int64", (2,)),  # (y, x) plane pixels of each mask's [0, 0]
)
"""The one definition of the per-nucleus columns; empty/take/concat and the array codec derive from it.
Measurements (name -> (N,) float64) are per-nucleus too but named at run time (``InstanceTable.measurements``)."""


@dataclass
class InstanceTable:
    """Owned nuclei of a slide (or of one region before stitching), column-wise (:data:`COLUMNS`).

    Geometry is kept twice on purpose: ``polygons`` in level-0 pixels for GeoJSON/Parquet, and
    ``masks`` (boolean crops at processing resolution, origin ``mask_offsets`` as (y, x) plane pixels)
    for the exact label raster.
    """

    ids: np.ndarray
    anchors: np.ndarray
    centroids: np.ndarray
    bboxes: np.ndarray
    class_ids: np.ndarray
    probabilities: np.ndarray
    polygons: list[np.ndarray]
    masks: list[np.ndarray]
    mask_offsets: np.ndarray
    measurements: dict[str, np.ndarray]  # name -> (N,) float64 (area_um2, perimeter_um, ...)
    plane: PlaneInfo
    edge_touching: int = 0  # owned instances that touched the halo edge (stitching rule 4)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.plane.class_names

    @property
    def class_colors(self) -> tuple[tuple[int, int, int], ...]:
        return self.plane.class_colors

    @property
    def mpp0(self) -> float:
        return self.plane.mpp0

    @property
    def scale(self) -> float:
        return self.plane.scale

    @property
    def plane_shape(self) -> tuple[int, int]:
        return self.plane.plane_shape

    @property
    def mpp(self) -> float:
        return self.plane.mpp

    def class_name(self, cid: int) -> str:
        return self.plane.class_name(cid)

    def class_color(self, cid: int) -> tuple[int, int, int]:
        return self.plane.class_color(cid)

    def class_id_range(self) -> range:
        """Every class id a raster of this table can hold: 0 (background), the card's classes, and any
        larger id present in ``class_ids``."""
        top = max(len(self.class_names), int(np.max(self.class_ids)) if len(self.class_ids) else 0)
        return range(top + 1)

    @staticmethod
    def empty(plane: PlaneInfo, measurement_names: tuple[str, ...] = ()) -> InstanceTable:
        """A table without nuclei (every column of :data:`COLUMNS` with its dtype)."""
        cols: dict[str, Any] = {c.name: [] if c.is_list else np.zeros((0, *c.shape), c.dtype) for c in COLUMNS}
        return InstanceTable(**cols, measurements={k: np.zeros(0, np.float64) for k in measurement_names}, plane=plane)

    def take(self, idx: np.ndarray) -> InstanceTable:
        """Rows ``idx`` of this table (a new table; same plane and ``edge_touching``)."""
        rows = [int(i) for i in idx]
        cols: dict[str, Any] = {}
        for c in COLUMNS:
            v = getattr(self, c.name)
            cols[c.name] = [v[i] for i in rows] if c.is_list else v[idx]
        meas = {k: v[idx] for k, v in self.measurements.items()}
        return InstanceTable(**cols, measurements=meas, plane=self.plane, edge_touching=self.edge_touching)

    @staticmethod
    def concat(tables: Sequence[InstanceTable]) -> InstanceTable:
        """Rows of ``tables`` in order; plane and measurement names of the first, ``edge_touching`` summed."""
        first = tables[0]
        cols: dict[str, Any] = {}
        for c in COLUMNS:
            parts = [getattr(t, c.name) for t in tables]
            cols[c.name] = [x for p in parts for x in p] if c.is_list else np.concatenate(parts)
        meas = {k: np.concatenate([t.measurements[k] for t in tables]) for k in first.measurements}
        edge = sum(t.edge_touching for t in tables)
        return InstanceTable(**cols, measurements=meas, plane=first.plane, edge_touching=edge)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (no objects, no plane) that :meth:`from_arrays` turns back into an equal table.

        A list column ``c`` becomes ``c__shapes`` (N, ndim) and ``c__data``, the items' values raveled
        and concatenated (bool: bit-packed, with ``c__size`` the bit count)."""
        out: dict[str, np.ndarray] = {}
        for c in COLUMNS:
            v = getattr(self, c.name)
            if not c.is_list:
                out[c.name] = v
                continue
            out[f"{c.name}__shapes"] = np.array([a.shape for a in v], np.int64).reshape(len(v), len(c.shape))
            flat = np.concatenate([np.asarray(a, c.dtype).ravel() for a in v]) if v else np.zeros(0, c.dtype)
            out[f"{c.name}__data"] = np.packbits(flat) if c.dtype == "bool" else flat
            out[f"{c.name}__size"] = np.asarray(flat.size, np.int64)
        out["measurement_names"] = np.array(list(self.measurements), dtype=str)
        for i, m in enumerate(self.measurements.values()):
            out[f"measurement_{i}"] = m
        out["edge_touching"] = np.asarray(self.edge_touching, np.int64)
        return out

    @staticmethod
    def from_arrays(a: Mapping[str, np.ndarray], plane: PlaneInfo) -> InstanceTable:
        """The table :meth:`to_arrays` encoded (``a``: a mapping of arrays, e.g. an ``NpzFile``) in ``plane``."""
        cols: dict[str, Any] = {}
        for c in COLUMNS:
            if not c.is_list:
                cols[c.name] = a[c.name]
                continue
            shapes = a[f"{c.name}__shapes"]
            flat = a[f"{c.name}__data"]
            if c.dtype == "bool":
                flat = np.unpackbits(flat, count=int(a[f"{c.name}__size"])).astype(bool)
            bounds = np.concatenate([[0], np.cumsum(np.prod(shapes, axis=1))]).astype(np.int64)
            cols[c.name] = [
                flat[bounds[i] : bounds[i + 1]].reshape([int(d) for d in shapes[i]]) for i in range(len(shapes))
            ]
        names = [str(n) for n in a["measurement_names"]]
        meas = {n: a[f"measurement_{i}"] for i, n in enumerate(names)}
        return InstanceTable(**cols, measurements=meas, plane=plane, edge_touching=int(a["edge_touching"]))
