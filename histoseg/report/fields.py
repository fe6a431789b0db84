"""Representative fields of a slide: chosen deterministically, read raw and drawn with their nuclei.

Fields are squares of ``FIELD_PX`` processing-plane pixels on a fixed grid. Candidates are grid cells
fully inside the plane and mostly tissue; they are ranked by nuclei count (ties: raster order) and the
densest, upper quartile, median, lower quartile and sparsest are shown (3 to 5 distinct fields; fewer only
when the slide has fewer candidate cells). Same outputs, same fields.

The overlay is the raw field with every nucleus filled in its class colour (``FILL_ALPHA`` blend) and
outlined in the exact class colour (no anti-aliasing), so a pixel on a nucleus contour carries the class
colour byte for byte in the lossless PNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np
import pyarrow.parquet as pq
import shapely

from histoseg.report.data import SlideOutputs
from histoseg.types import Box

__all__ = ["FIELD_PX", "FILL_ALPHA", "Field", "choose_fields", "draw_overlay", "render_fields"]

FIELD_PX = 256  # field side in processing-plane pixels (128 µm at 0.5 µm/px)
FILL_ALPHA = 0.35
MIN_FIELD_TISSUE = 0.5  # a candidate cell is at least half tissue (else the best tenth; else any cell)
_QUANTILES = ((0.0, "densest"), (0.25, "upper quartile"), (0.5, "median"), (0.75, "lower quartile"),
              (1.0, "sparsest"))  # fmt: skip


@dataclass
class Field:
    """One shown field: where it is (plane and level-0 px), why it was chosen, and its pictures."""

    label: str
    plane_box: Box  # processing-plane pixels
    level0_box: tuple[float, float, float, float]  # (x, y, w, h) level-0 px
    nuclei: int
    raw: np.ndarray | None = None  # (FIELD_PX, FIELD_PX, 3) uint8 RGB
    overlay: np.ndarray | None = None
    class_counts: dict[int, int] = field(default_factory=dict)


def _grid(outputs: SlideOutputs) -> tuple[int, int, tuple[int, int]]:
    shape = outputs.provenance.get("processing", {}).get("plane_shape") or [0, 0]
    h, w = int(shape[0]), int(shape[1])
    return max(1, h // FIELD_PX), max(1, w // FIELD_PX), (h, w)


def _cell_tissue(tissue: np.ndarray | None, rows: int, cols: int, plane: tuple[int, int]) -> np.ndarray:
    """Tissue fraction of each grid cell (the mask covers the whole plane)."""
    if tissue is None:
        return np.ones((rows, cols))
    mh, mw = tissue.shape
    out = np.zeros((rows, cols))
    m = tissue.astype(np.float64)
    for r in range(rows):
        y0 = int(r * FIELD_PX * mh / plane[0])
        y1 = max(y0 + 1, int(math.ceil((r + 1) * FIELD_PX * mh / plane[0])))
        for c in range(cols):
            x0 = int(c * FIELD_PX * mw / plane[1])
            x1 = max(x0 + 1, int(math.ceil((c + 1) * FIELD_PX * mw / plane[1])))
            out[r, c] = m[y0:y1, x0:x1].mean() if y0 < mh and x0 < mw else 0.0
    return out


def choose_fields(outputs: SlideOutputs) -> list[Field]:
    """The representative fields of a slide (no pixels yet), deterministic for given outputs."""
    rows, cols, plane = _grid(outputs)
    if min(plane) < FIELD_PX or outputs.nuclei is None:
        return []
    scale = outputs.scale
    counts = np.zeros((rows, cols), np.int64)
    cent = outputs.nuclei.centroids / scale
    r = np.floor(cent[:, 1] / FIELD_PX).astype(np.int64)
    c = np.floor(cent[:, 0] / FIELD_PX).astype(np.int64)
    ok = (r >= 0) & (r < rows) & (c >= 0) & (c < cols)
    np.add.at(counts, (r[ok], c[ok]), 1)
    tissue = _cell_tissue(outputs.tissue, rows, cols, plane)
    cells = np.argwhere(tissue >= MIN_FIELD_TISSUE)
    if not len(cells):
        cells = np.argwhere(tissue >= max(1e-9, 0.1 * tissue.max()))
    if not len(cells):
        cells = np.argwhere(np.ones_like(tissue, bool))
    order = sorted(range(len(cells)), key=lambda i: (-counts[tuple(cells[i])], int(cells[i][0]), int(cells[i][1])))
    picked: list[tuple[int, str]] = []
    for q, label in _QUANTILES:
        i = int(round(q * (len(order) - 1)))
        if all(i != j for j, _ in picked):
            picked.append((i, label))
    out = []
    for i, label in picked:
        rr, cc = (int(v) for v in cells[order[i]])
        box = Box(cc * FIELD_PX, rr * FIELD_PX, FIELD_PX, FIELD_PX)
        l0 = (box.x * scale, box.y * scale, box.w * scale, box.h * scale)
        out.append(Field(label, box, l0, int(counts[rr, cc])))
    return out


def _field_polygons(parquet: str, fields: list[Field]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(class ids, polygons) of the nuclei whose bounding box meets each field, one Parquet read."""
    if not fields:
        return []
    filters = [
        [("bbox_x1", ">=", f.level0_box[0]), ("bbox_x0", "<=", f.level0_box[0] + f.level0_box[2]),
         ("bbox_y1", ">=", f.level0_box[1]), ("bbox_y0", "<=", f.level0_box[1] + f.level0_box[3])]
        for f in fields
    ]  # fmt: skip
    tab = pq.read_table(parquet, columns=["bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1", "class_id", "polygon"],
                        filters=filters)  # type: ignore[arg-type]
    bx = np.stack([tab.column(k).to_numpy() for k in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")], axis=1)
    cls = tab.column("class_id").to_numpy().astype(np.int64)
    polys = shapely.from_wkb(np.asarray(tab.column("polygon").to_pylist(), dtype=object))
    out = []
    for f in fields:
        x, y, w, h = f.level0_box
        sel = (bx[:, 2] >= x) & (bx[:, 0] <= x + w) & (bx[:, 3] >= y) & (bx[:, 1] <= y + h)
        out.append((cls[sel], polys[sel]))
    return out


def draw_overlay(
    raw: np.ndarray,
    polygons: np.ndarray,
    class_ids: np.ndarray,
    colors: dict[int, tuple[int, int, int]],
    origin_level0: tuple[float, float],
    scale: float,
    default_color: tuple[int, int, int] = (160, 160, 160),
) -> np.ndarray:
    """``raw`` with each polygon (level-0 px) filled by a blend of its class colour and outlined in it."""
    fill = raw.copy()
    lines: list[tuple[np.ndarray, tuple[int, int, int]]] = []
    shift = 2  # sub-pixel vertices: 1/4 px
    for poly, cid in zip(polygons, class_ids.tolist(), strict=True):
        if poly is None or poly.is_empty:
            continue
        xy = np.asarray(poly.exterior.coords, dtype=np.float64)
        pts = np.round(((xy - np.asarray(origin_level0)) / scale - 0.5) * (1 << shift)).astype(np.int32)
        color = colors.get(int(cid), default_color)
        cv2.fillPoly(fill, [pts], color, lineType=cv2.LINE_8, shift=shift)
        lines.append((pts, color))
    out = cv2.addWeighted(fill, FILL_ALPHA, raw, 1 - FILL_ALPHA, 0.0)
    for pts, color in lines:
        cv2.polylines(out, [pts], True, color, 1, lineType=cv2.LINE_8, shift=shift)
    return np.asarray(out, np.uint8)


def render_fields(outputs: SlideOutputs, fields: list[Field], reader: object | None) -> None:
    """Fill ``raw`` (from ``reader``: a SlideReader, or None: white) and ``overlay`` of every field."""
    if not fields or outputs.nuclei is None or outputs.parquet is None:
        return
    mpp = float(outputs.provenance.get("processing", {}).get("mpp") or outputs.provenance["model"]["mpp"])
    per_field = _field_polygons(str(outputs.parquet), fields)
    for f, (cls, polys) in zip(fields, per_field, strict=True):
        if reader is not None:
            f.raw = np.ascontiguousarray(reader.read_plane(f.plane_box, mpp))  # type: ignore[attr-defined]
        else:
            f.raw = np.full((f.plane_box.h, f.plane_box.w, 3), 255, np.uint8)
        f.overlay = draw_overlay(f.raw, polys, cls, outputs.nuclei.class_colors, f.level0_box[:2], outputs.scale)
        ids, counts = np.unique(cls, return_counts=True)
        f.class_counts = {int(i): int(n) for i, n in zip(ids, counts, strict=True)}
