"""The report's pictures as PNG/JPEG bytes.

Plots use ``matplotlib.figure.Figure`` objects with the Agg canvas directly: no ``pyplot``, no global
state, no ``rcParams`` changes, so building a report inside a long-running process (a Dask client, a
notebook) changes nothing around it. Picture-like images (thumbnail, fields) are drawn with OpenCV.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from histoseg.report.data import NucleiColumns, SlideOutputs
from histoseg.types import Box

__all__ = [
    "density_grid",
    "density_figure",
    "distributions_figure",
    "encode_jpeg",
    "encode_png",
    "loss_figure",
    "thumbnail_overlay",
]

MASK_COLOR = (0, 170, 0)
REGION_COLOR = (40, 90, 220)
FIELD_COLOR = (240, 160, 0)
DENSITY_CELL_UM = 64.0  # side of a density heatmap cell
_DPI = 100


def encode_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def encode_jpeg(rgb: np.ndarray, quality: int = 88) -> bytes:
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def _figure(w: float, h: float, left: float = 0.8, bottom: float = 0.5, right: float = 0.2, top: float = 0.3) -> Any:
    """A figure with fixed margins in inches (a layout engine costs ~0.1 s per figure: the report's budget)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=_DPI)
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h, wspace=0.25)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def thumbnail_overlay(
    thumb: np.ndarray,
    tissue: np.ndarray | None,
    level0_per_thumb_px: float,
    regions: Sequence[Box],
    fields: Sequence[tuple[str, tuple[float, float, float, float]]],
) -> np.ndarray:
    """Thumbnail with the tissue mask outline, processed region cores and numbered fields (level-0 boxes)."""
    out = np.ascontiguousarray(thumb[..., :3]).copy()
    h, w = out.shape[:2]
    if tissue is not None and tissue.size:
        mask = cv2.resize(tissue.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, MASK_COLOR, 2)
    t = level0_per_thumb_px
    for b in regions:
        p0 = (int(b.x / t), int(b.y / t))
        p1 = (min(w - 1, int(math.ceil(b.x1 / t)) - 1), min(h - 1, int(math.ceil(b.y1 / t)) - 1))
        cv2.rectangle(out, p0, p1, REGION_COLOR, 1)
    for i, (_, (x, y, bw, bh)) in enumerate(fields, 1):
        p0, p1 = (int(x / t), int(y / t)), (int((x + bw) / t), int((y + bh) / t))
        cv2.rectangle(out, p0, p1, FIELD_COLOR, 2)
        cv2.putText(out, str(i), (p0[0] + 3, max(12, p0[1] - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, FIELD_COLOR, 1,
                    cv2.LINE_AA)  # fmt: skip
    return out


def density_grid(outputs: SlideOutputs) -> tuple[np.ndarray, float] | None:
    """Nuclei per mm² on a grid of ~``DENSITY_CELL_UM`` cells (NaN where the cell is not tissue), cell px."""
    mpp0 = outputs.mpp0
    w, h = outputs.dimensions
    if outputs.nuclei is None or mpp0 is None or not w or not h:
        return None
    cell = max(DENSITY_CELL_UM / mpp0, max(w, h) / 256.0)  # level-0 px; at most 256 cells per side
    cols, rows = max(1, math.ceil(w / cell)), max(1, math.ceil(h / cell))
    cx = np.clip((outputs.nuclei.centroids[:, 0] / cell).astype(np.int64), 0, cols - 1)
    cy = np.clip((outputs.nuclei.centroids[:, 1] / cell).astype(np.int64), 0, rows - 1)
    counts = np.zeros((rows, cols))
    np.add.at(counts, (cy, cx), 1)
    area_mm2 = (cell * mpp0 / 1000.0) ** 2
    dens = counts / area_mm2
    if outputs.tissue is not None:
        frac = cv2.resize(outputs.tissue.astype(np.float32), (cols, rows), interpolation=cv2.INTER_AREA)
        dens = np.where((frac > 0.25) | (counts > 0), dens / np.maximum(frac, 0.25), np.nan)
    return dens, cell


def density_figure(grid: np.ndarray, cell_px: float, mpp0: float) -> bytes:
    """Heatmap of nuclei per mm² of tissue."""
    rows, cols = grid.shape
    aspect = rows / max(cols, 1)
    height = max(2.5, min(7.0, 4.6 * aspect + 0.8))
    width = min(6.4, (height - 0.8) / aspect + 2.2)
    fig = _figure(width, height, right=1.4)
    ax = fig.add_subplot()
    cax = fig.add_axes((1 - 1.15 / width, 0.5 / height, 0.15 / width, 1 - 0.8 / height))
    ext_mm = (0, cols * cell_px * mpp0 / 1000, rows * cell_px * mpp0 / 1000, 0)
    im = ax.imshow(grid, cmap="magma", interpolation="nearest", extent=ext_mm)
    ax.set_facecolor("#e8e8e8")
    ax.set_xlabel("x (mm)")
    ax.set_ylabel("y (mm)")
    fig.colorbar(im, cax=cax, label="nuclei / mm² of tissue")
    return _png(fig)


def _rgb01(c: tuple[int, int, int]) -> tuple[float, float, float]:
    return c[0] / 255.0, c[1] / 255.0, c[2] / 255.0


_DIST = (("area_um2", "area (µm²)"), ("eccentricity", "eccentricity"), ("mean_hematoxylin", "hematoxylin (OD)"))


def distributions_figure(nuclei: NucleiColumns) -> bytes | None:
    """Histograms of area, eccentricity and hematoxylin per class (step lines in class colours)."""
    present = [(k, label) for k, label in _DIST if k in nuclei.measures]
    if not present or not len(nuclei):
        return None
    fig = _figure(9.6, 2.8, left=0.7, top=0.35)
    axes = fig.subplots(1, len(present), squeeze=False)[0]
    classes = np.unique(nuclei.class_ids)
    for ax, (key, label) in zip(axes, present, strict=True):
        values = nuclei.measures[key]
        finite = np.isfinite(values)
        if not finite.any():
            ax.set_title(f"{label}: no values", fontsize=9)
            continue
        lo, hi = np.percentile(values[finite], [0.5, 99.5])
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
        for cid in classes:
            v = values[finite & (nuclei.class_ids == cid)]
            name = nuclei.class_names.get(int(cid), f"class {int(cid)}")
            ax.hist(np.clip(v, bins[0], bins[-1]), bins=bins, histtype="step", linewidth=1.4,
                    color=_rgb01(nuclei.color_of(int(cid))), label=name)  # fmt: skip
        med = float(np.median(values[finite]))
        ax.axvline(med, color="#555555", linestyle="--", linewidth=0.8)
        ax.set_xlabel(label)
        ax.set_title(f"median {med:.3g}", fontsize=9)
    axes[0].set_ylabel("nuclei")
    if len(classes) > 1:
        axes[-1].legend(fontsize=8, frameon=False)
    return _png(fig)


def loss_figure(history: Sequence[float | None], best_step: int | None) -> bytes | None:
    """The adaptation's alignment loss per step, best step marked."""
    steps = [i for i, v in enumerate(history) if v is not None]
    if not steps:
        return None
    values = [float(history[i]) for i in steps]  # type: ignore[arg-type]
    fig = _figure(5.2, 2.6, left=0.9)
    ax = fig.add_subplot()
    ax.plot(steps, values, marker="o", color="#2a5ad8")
    if best_step is not None and 0 <= best_step < len(history) and history[best_step] is not None:
        ax.plot([best_step], [history[best_step]], marker="*", markersize=14, color="#e08000", label="kept")
        ax.legend(frameon=False, fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("alignment loss")
    ax.grid(alpha=0.3)
    return _png(fig)
