"""The scene: tissue layout, compartments and nuclei, all global and deterministic for a seed.

A tissue outline from a few large irregular blobs thresholded to cover ~50-70 % of the canvas; glands
(epithelial cytoplasm ring around a white lumen), solid epithelial nests, small vessels with red cells,
lymphoid aggregates and sparse stromal cells; slowly varying fields (stroma density, fibre orientation,
stain strength, cellularity) on an ``LR``-px grid.  Everything comes from one seeded RNG, in a fixed order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

try:  # imported from the package (python -m sample_data.make_sample, tests)
    from sample_data.synth_common import (
        C_CYTO,
        C_LUMEN,
        C_RBC,
        C_RBC_PALE,
        C_VESSEL,
        EPI,
        LR,
        LYM,
        OTH,
        STR,
        Star,
        rand_star,
        sample_lr,
        smooth_noise,
    )
    from sample_data.synth_nuclei import Placer
except ModuleNotFoundError:  # run as python sample_data/make_sample.py: this folder is sys.path[0]
    from synth_common import (
        C_CYTO,
        C_LUMEN,
        C_RBC,
        C_RBC_PALE,
        C_VESSEL,
        EPI,
        LR,
        LYM,
        OTH,
        STR,
        Star,
        rand_star,
        sample_lr,
        smooth_noise,
    )
    from synth_nuclei import Placer


@dataclass
class Scene:
    """Everything global: low-resolution fields, compartment map, nuclei and their stamped hematoxylin."""

    width: int
    height: int
    seed: int
    tissue_lr: np.ndarray  # float32 (h_lr, w_lr): tissue where > tissue_thr
    tissue_thr: float
    orient_lr: np.ndarray  # float32 (2, h_lr, w_lr): cos 2θ, sin 2θ of the fibre direction
    stroma_e_lr: np.ndarray  # float32: eosin OD of the stroma before texture
    h_scale_lr: np.ndarray  # float32: slide-scale hematoxylin strength variation
    e_scale_lr: np.ndarray  # float32: same for eosin
    comp: np.ndarray  # uint8 (H, W) compartments
    labels: np.ndarray  # uint32 (H, W) nuclei instance map
    nuc_h: np.ndarray  # float16 (H, W) hematoxylin OD profile of the nuclei (0 outside)
    classes: np.ndarray  # uint8 (N,)
    centroids: np.ndarray  # float64 (N, 2) x, y
    chrom_fine: np.ndarray  # float32 (N + 1,) fine chromatin amplitude per label (0 for background)
    chrom_coarse: np.ndarray  # float32 (N + 1,) coarse chromatin amplitude per label

    @property
    def tissue_fraction(self) -> float:
        return float(np.mean(self.tissue_lr > self.tissue_thr))


def _lr_grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 pixel indices of the low-resolution cell centres (for ``Star.polar``)."""
    hl, wl = math.ceil(height / LR), math.ceil(width / LR)
    ys = ((np.arange(hl) + 0.5) * LR - 0.5)[:, None]
    xs = ((np.arange(wl) + 0.5) * LR - 0.5)[None, :]
    return ys, xs


def _tissue_field(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, float]:
    """A few large irregular tissue pieces (one per cell of a 1x2 .. 2x2 layout) with ragged edges.

    Returns the low-resolution field and its threshold; coverage is kept within 50-68 % of the canvas.
    """
    ys, xs = _lr_grid(width, height)
    hl, wl = ys.shape[0], xs.shape[1]
    side = min(width, height)
    layouts = ((1, 2), (2, 1), (2, 2), (2, 2), (1, 3), (3, 1))
    rows, cols = layouts[int(rng.integers(len(layouts)))]
    cw, ch = width / cols, height / rows
    field = np.full((hl, wl), -1.0)
    for i in range(rows):
        for j in range(cols):
            star = rand_star(
                rng,
                (j + 0.5 + rng.normal(0, 0.04)) * cw,
                (i + 0.5 + rng.normal(0, 0.04)) * ch,
                0.5 * cw * rng.uniform(0.78, 0.92),
                0.5 * ch * rng.uniform(0.78, 0.92),
                rng.normal(0, 0.12),
                (0.10, 0.07, 0.05, 0.03),
            )
            rho, lim = star.polar(ys, xs)
            field = np.maximum(field, 1.0 - rho / lim)
    field += 0.07 * smooth_noise(rng, (hl, wl), max(hl, wl) / 16)
    field += 0.035 * smooth_noise(rng, (hl, wl), 5.0)
    field += 0.015 * smooth_noise(rng, (hl, wl), 1.5)
    d = np.minimum(np.minimum(ys + 0.5, height - ys - 0.5), np.minimum(xs + 0.5, width - xs - 0.5))
    field -= 0.8 * np.clip(1.0 - d / (0.04 * side), 0.0, 1.0)  # keep the tissue off the slide edge
    coverage = float(np.mean(field > 0))
    thr = 0.0
    if not 0.5 <= coverage <= 0.68:
        thr = float(np.quantile(field, 1.0 - min(max(coverage, 0.5), 0.68)))
    return field.astype(np.float32), thr


def _star_fits(
    star: Star, safe_lr: np.ndarray, taken_lr: np.ndarray, grow: float, width: int, height: int
) -> tuple[int, int, int, int] | None:
    """Bounding box of a structure when it lies in safe tissue, clear of other structures (then marked).

    Checked on the low-resolution grid: the structure grown by ``grow`` must not meet another grown one.
    """
    r = int(math.ceil(star.reach * grow)) + 2
    x0, y0 = int(star.cx) - r, int(star.cy) - r
    x1, y1 = int(star.cx) + r + 1, int(star.cy) + r + 1
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        return None
    j0, j1, i0, i1 = x0 // LR, math.ceil(x1 / LR), y0 // LR, math.ceil(y1 / LR)
    ys = ((np.arange(i0, i1) + 0.5) * LR - 0.5)[:, None]
    xs = ((np.arange(j0, j1) + 0.5) * LR - 0.5)[None, :]
    rho, lim = star.polar(ys, xs)
    if not safe_lr[i0:i1, j0:j1][rho <= lim * 1.05].all():
        return None
    grown = rho <= lim * grow
    if taken_lr[i0:i1, j0:j1][grown].any():
        return None
    taken_lr[i0:i1, j0:j1][grown] = True
    return x0, y0, x1, y1


class _Sites:
    """Random level-0 points in safe tissue, cells weighted by a low-resolution field."""

    def __init__(self, safe_lr: np.ndarray, weight_lr: np.ndarray | None = None):
        w = safe_lr.astype(np.float64).ravel()
        if weight_lr is not None:
            w = w * weight_lr.ravel()
        self.cdf = np.cumsum(w)
        self.cols = safe_lr.shape[1]

    def __call__(self, rng: np.random.Generator) -> tuple[float, float]:
        k = int(np.searchsorted(self.cdf, rng.random() * self.cdf[-1], side="right"))
        i, j = divmod(min(k, self.cdf.size - 1), self.cols)
        return (j + rng.random()) * LR, (i + rng.random()) * LR


def build_scene(width: int, height: int, seed: int) -> Scene:
    """Tissue outline, compartments and every nucleus (global, deterministic for ``seed``)."""
    if width < 256 or height < 256:
        raise ValueError(f"size must be at least 256 x 256 px, got {width} x {height}")
    rng = np.random.default_rng([seed, 0x4E5])
    tissue_lr, thr = _tissue_field(rng, width, height)
    hl, wl = tissue_lr.shape
    tissue = tissue_lr > thr
    safe_lr = ndi.binary_erosion(tissue, iterations=2)
    if not safe_lr.any():
        safe_lr = tissue
    tissue_px = float(tissue.sum()) * LR * LR

    big = max(hl, wl)
    ang = 0.5 * np.pi * smooth_noise(rng, (hl, wl), 40.0) + rng.uniform(0, np.pi)
    orient_lr = np.stack([np.cos(2 * ang), np.sin(2 * ang)]).astype(np.float32)
    stroma_e_lr = (0.38 * np.clip(1 + 0.15 * smooth_noise(rng, (hl, wl), 12.0), 0.6, 1.4)).astype(np.float32)
    h_scale_lr = (1 + 0.05 * smooth_noise(rng, (hl, wl), big / 6)).astype(np.float32)
    e_scale_lr = (1 + 0.06 * smooth_noise(rng, (hl, wl), big / 6)).astype(np.float32)
    cell_lr = 1.0 / (1.0 + np.exp(-1.8 * smooth_noise(rng, (hl, wl), 18.0)))  # cellularity, 0..1

    comp = np.zeros((height, width), np.uint8)
    taken_lr = np.zeros((hl, wl), bool)  # cells claimed by glands, nests and vessels
    nest_sites, gland_sites = _Sites(safe_lr, cell_lr), _Sites(safe_lr, 0.2 + cell_lr)
    any_sites = _Sites(safe_lr)
    placer = Placer(width, height, comp, safe_lr)
    scale = tissue_px / 1e6  # tissue area in Mpx

    # Solid epithelial (tumour) nests: crowded pleomorphic nuclei, many touching.
    for _ in range(int(rng.poisson(2.0 * scale)) + 1):
        for _attempt in range(25):
            x, y = nest_sites(rng)
            a = rng.uniform(100.0, 260.0)
            star = rand_star(rng, x, y, a, a * rng.uniform(0.5, 0.9), rng.uniform(0, np.pi), (0.10, 0.07, 0.05, 0.03))
            box = _star_fits(star, safe_lr, taken_lr, 1.12, width, height)
            if box is None:
                continue
            x0, y0, x1, y1 = box
            yy, xx = np.ogrid[y0:y1, x0:x1]
            rho, lim = star.polar(yy.astype(np.float64), xx.astype(np.float64))
            comp[y0:y1, x0:x1][rho <= lim] = C_CYTO
            n_target = math.pi * star.a * star.b / (math.pi * 21.0**2) * rng.uniform(0.6, 0.85)
            for _k in range(int(6 * n_target)):
                px, py = star.point(rng.uniform(0, 2 * np.pi), math.sqrt(rng.uniform(0, 0.9)))
                placer.place(rng, EPI, px, py, allowed=(C_CYTO,), touch=0.6, kind="tumour")
            break

    # Glands: epithelial ring (columnar nuclei near the basement membrane) around a white lumen.
    for _ in range(int(rng.poisson(5.0 * scale)) + 1):
        for _attempt in range(25):
            x, y = gland_sites(rng)
            a = rng.uniform(110.0, 240.0)
            star = rand_star(
                rng, x, y, a, a * rng.uniform(0.55, 0.95), rng.uniform(0, np.pi), (0.06, 0.04, 0.025, 0.015)
            )
            box = _star_fits(star, safe_lr, taken_lr, 1.15, width, height)
            if box is None:
                continue
            x0, y0, x1, y1 = box
            yy, xx = np.ogrid[y0:y1, x0:x1]
            rho, lim = star.polar(yy.astype(np.float64), xx.astype(np.float64))
            s_in = max(0.15, 1.0 - rng.uniform(65.0, 105.0) / min(star.a, star.b))
            sub = comp[y0:y1, x0:x1]
            sub[rho <= lim] = C_CYTO
            sub[rho <= lim * s_in] = C_LUMEN
            stratified = rng.random() < 0.3
            perim = math.pi * (star.a + star.b) * (1 + s_in) / 2
            n_target = perim / 21.0 * (1.6 if stratified else 1.0)
            for _k in range(int(10 * n_target)):
                t = rng.uniform(0, 2 * np.pi)
                lo, hi = (0.1, 0.9) if stratified else (0.45, 0.85)
                px, py = star.point(t, s_in + (1 - s_in) * rng.uniform(lo, hi))
                radial = math.atan2(py - star.cy, px - star.cx) + rng.normal(0, 0.15)
                placer.place(rng, EPI, px, py, allowed=(C_CYTO,), theta=radial, touch=0.5, kind="gland")
            break

    # Small vessels: lumen with red cells, flat endothelial nuclei on the wall.
    for _ in range(int(rng.poisson(1.6 * scale)) + 1):
        for _attempt in range(20):
            x, y = any_sites(rng)
            a = rng.uniform(18.0, 60.0)
            star = rand_star(rng, x, y, a, a * rng.uniform(0.35, 1.0), rng.uniform(0, np.pi), (0.06, 0.04, 0.02, 0.01))
            box = _star_fits(star, safe_lr, taken_lr, 1.6, width, height)
            if box is None:
                continue
            x0, y0, x1, y1 = box
            yy, xx = np.ogrid[y0:y1, x0:x1]
            rho, lim = star.polar(yy.astype(np.float64), xx.astype(np.float64))
            sub = comp[y0:y1, x0:x1]
            lumen = rho <= lim
            sub[lumen] = C_VESSEL
            for _k in range(int(star.a * star.b / 169.0 * rng.uniform(0.2, 0.9))):
                rx, ry = star.point(rng.uniform(0, 2 * np.pi), math.sqrt(rng.uniform(0, 0.8)))
                rr = rng.uniform(11.0, 14.0)
                rbc = Star(rx, ry, rr, rr * rng.uniform(0.8, 1.0), rng.uniform(0, np.pi), np.zeros(4), np.zeros(4))
                rrho, rlim = rbc.polar(yy.astype(np.float64), xx.astype(np.float64))
                sub[lumen & (rrho <= rlim)] = C_RBC
                sub[lumen & (rrho <= 0.45)] = C_RBC_PALE
            mean_r = 0.5 * (star.a + star.b)
            for _k in range(max(2, int(2 * math.pi * mean_r / 70.0))):
                t = rng.uniform(0, 2 * np.pi)
                px, py = star.point(t, 1.0 + 9.0 / mean_r)
                tang = math.atan2(py - star.cy, px - star.cx) + math.pi / 2
                placer.place(rng, OTH, px, py, theta=tang, touch=0.0, kind="endothelial")
            break

    # Lymphoid aggregates: dense small dark round nuclei.
    for _ in range(int(rng.poisson(1.0 * scale)) + 1):
        x, y = nest_sites(rng)
        sig = rng.uniform(50.0, 150.0)
        n_target = 2 * math.pi * sig**2 / 900.0 * rng.uniform(0.6, 1.0)
        for _k in range(int(4 * n_target)):
            px, py = rng.normal(x, sig), rng.normal(y, sig)
            placer.place(rng, LYM, px, py, touch=0.3)

    # Sparse stroma: fibroblasts along the fibres, scattered lymphocytes and other cells.
    for cls, density in ((STR, 200e-6), (LYM, 150e-6), (OTH, 35e-6)):
        n = int(rng.poisson(density * width * height))
        px_all = rng.uniform(0, width, n)
        py_all = rng.uniform(0, height, n)
        acc = rng.random(n)
        for px, py, u in zip(px_all, py_all, acc, strict=True):
            if u > 0.25 + 0.75 * sample_lr(cell_lr, px, py):
                continue
            theta = None
            if cls == STR:
                c2, s2 = sample_lr(orient_lr[0], px, py), sample_lr(orient_lr[1], px, py)
                theta = 0.5 * math.atan2(s2, c2) + rng.normal(0, 0.15)
            placer.place(rng, cls, px, py, theta=theta, touch=0.08)

    n = len(placer.classes)
    return Scene(
        width=width,
        height=height,
        seed=seed,
        tissue_lr=tissue_lr,
        tissue_thr=thr,
        orient_lr=orient_lr,
        stroma_e_lr=stroma_e_lr,
        h_scale_lr=h_scale_lr,
        e_scale_lr=e_scale_lr,
        comp=comp,
        labels=placer.labels,
        nuc_h=placer.nuc_h,
        classes=np.asarray(placer.classes, np.uint8).reshape(n),
        centroids=np.asarray(placer.centroids, np.float64).reshape(n, 2),
        chrom_fine=np.asarray(placer.fine, np.float32),
        chrom_coarse=np.asarray(placer.coarse, np.float32),
    )
