"""Typed objects that travel along the data flow (design.md section 1).

Coordinate conventions, fixed once here:

* ``level-0`` coordinates are pixels of the full-resolution image as QuPath shows it, origin top-left.
* the *processing plane* is the slide resampled to the model's mpp; pixel ``(i, j)`` of the plane covers
  level-0 ``[j * scale, (j + 1) * scale) x [i * scale, (i + 1) * scale)`` where ``scale = mpp / mpp0``.
* boxes are half-open ``[x, x + w) x [y, y + h)``; arrays are indexed ``[y, x]``.

Class ids, fixed once here (:meth:`InstanceTable.class_name` / :meth:`InstanceTable.class_color`): id ``0``
is background / unclassified; id ``k >= 1`` is entry ``k - 1`` of the model card's class list (the card
numbers its classes from 1), so ``class_names`` and ``class_colors`` never contain the background.
"""

from __future__ import annotations

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

    ``core`` boxes of all regions partition the plane (stitching rule 1); ``read`` is ``core`` grown by
    ``halo`` on each side and may extend past the slide (padded with white).
    """

    row: int
    col: int
    core: Box
    halo: int

    @property
    def read(self) -> Box:
        h = self.halo
        return Box(self.core.x - h, self.core.y - h, self.core.w + 2 * h, self.core.h + 2 * h)

    @property
    def key(self) -> str:
        return f"r{self.row:05d}_c{self.col:05d}"


@dataclass
class RegionPrediction:
    """Dense network outputs over a region's ``read`` box at processing resolution.

    ``np_prob``: (H, W) float32 nucleus probability; ``hv``: (2, H, W) float32 horizontal/vertical maps in
    [-1, 1]; ``tp_prob``: (C, H, W) float32 type probabilities (C includes background at 0) or None.
    """

    region: Region
    np_prob: np.ndarray
    hv: np.ndarray
    tp_prob: np.ndarray | None


@dataclass
class InstanceTable:
    """Owned nuclei of a slide (or of one region before stitching), column-wise.

    Geometry is kept twice on purpose: ``polygons`` in level-0 pixels for GeoJSON/Parquet, and
    ``masks`` (boolean crops at processing resolution, origin ``mask_offsets`` as (y, x) plane pixels)
    for the exact label raster.
    """

    ids: np.ndarray  # (N,) uint32, 1-based global ids (0 until stitched)
    anchors: np.ndarray  # (N, 2) int64 (y, x) plane pixels: floor of the plane centroid
    centroids: np.ndarray  # (N, 2) float64 (x, y) level-0 pixels
    bboxes: np.ndarray  # (N, 4) float64 (x0, y0, x1, y1) level-0 pixels
    class_ids: np.ndarray  # (N,) uint8: 0 = unclassified, k >= 1 = class_names[k - 1] (see class_name)
    probabilities: np.ndarray  # (N,) float32: mean probability of the assigned type (or NP)
    polygons: list[np.ndarray]  # (K, 2) float64 (x, y) level-0, not repeated closing vertex
    masks: list[np.ndarray]  # bool crops at processing resolution
    mask_offsets: np.ndarray  # (N, 2) int64 (y, x) plane pixels
    measurements: dict[str, np.ndarray]  # name -> (N,) float64 (area_um2, perimeter_um, ...)
    class_names: tuple[str, ...]
    class_colors: tuple[tuple[int, int, int], ...]
    mpp0: float  # level-0 microns per pixel
    scale: float  # level-0 pixels per processing-plane pixel
    plane_shape: tuple[int, int]  # (H, W) of the processing plane
    edge_touching: int = 0  # owned instances that touched the halo edge (stitching rule 4)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

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

    def class_id_range(self) -> range:
        """Every class id a raster of this table can hold: 0 (background), the card's classes, and any
        larger id present in ``class_ids``."""
        top = max(len(self.class_names), int(np.max(self.class_ids)) if len(self.class_ids) else 0)
        return range(top + 1)

    @staticmethod
    def empty(
        class_names: tuple[str, ...],
        class_colors: tuple[tuple[int, int, int], ...],
        mpp0: float,
        scale: float,
        plane_shape: tuple[int, int],
        measurement_names: tuple[str, ...] = (),
    ) -> InstanceTable:
        return InstanceTable(
            ids=np.zeros(0, np.uint32),
            anchors=np.zeros((0, 2), np.int64),
            centroids=np.zeros((0, 2), np.float64),
            bboxes=np.zeros((0, 4), np.float64),
            class_ids=np.zeros(0, np.uint8),
            probabilities=np.zeros(0, np.float32),
            polygons=[],
            masks=[],
            mask_offsets=np.zeros((0, 2), np.int64),
            measurements={k: np.zeros(0, np.float64) for k in measurement_names},
            class_names=class_names,
            class_colors=class_colors,
            mpp0=mpp0,
            scale=scale,
            plane_shape=plane_shape,
        )


JSONDict = dict[str, Any]
