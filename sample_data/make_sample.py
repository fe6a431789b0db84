#!/usr/bin/env python
"""Generate the embedded demo slide: synthetic H&E tissue with exact nuclei ground truth.

Usage::

    python sample_data/make_sample.py [OUT.tif] [--size 4096] [--seed 0]

Writes ``OUT.tif`` (pyramidal tiled TIFF at 0.25 µm/px, i.e. 40x, through
``histoseg.io.write_pyramidal_tiff``), ``OUT.npz`` (``labels`` uint32 instance map at level-0 resolution,
``classes`` uint8 per instance, ``centroids`` float64 (x, y) level-0 px, ``class_names``) and ``OUT.json``
(size, mpp, seed, counts).  Instance ``i`` (1-based) of ``labels`` is row ``i - 1`` of ``classes`` and
``centroids``.  Centroids follow ``histoseg.postprocess.instance_centroids``: pixel ``j`` spans
``[j, j + 1)``, so a centroid is the mean pixel index + 0.5 and ``floor`` of it is a pixel of its nucleus.

Classes: 1 epithelial, 2 lymphocyte/inflammatory, 3 stromal/fibroblast, 4 other (endothelial, plasma-like).

How the picture is made (all sizes at 0.25 µm/px):

1. *Scene* (global, one seeded RNG): a tissue outline from a few large irregular blobs thresholded to cover
   ~50-70 % of the canvas; glands (epithelial cytoplasm ring around a white lumen), solid epithelial nests,
   small vessels with red cells; slowly varying fields (stroma density, fibre orientation, stain strength,
   cellularity) on an 8-px grid.
2. *Nuclei* (global, before any pixel is rendered, so no nucleus is cut by a tile seam): star-shaped
   ellipses (random radial harmonics) placed by dart throwing into the global label map, per class size and
   shape; most keep a 1-px gap, a fraction may touch/abut like in real tissue (the later one is clipped).
   Each nucleus stamps its hematoxylin profile (vesicular rim, nucleoli) into a global map.
3. *Render* in row strips: optical densities ``H``, ``E`` from the compartments, fibre texture (oriented
   smoothed noise) and chromatin noise, composed by Beer-Lambert ``I = 255 exp(-(H h + E e + bg))``,
   blurred by a point-spread function and given sensor/JPEG-like luminance and chroma noise.  Every random
   texture comes from noise tiles seeded by ``(seed, stream, tile row, tile col)``, so the pixels do not
   depend on the strip height and never show seams.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from scipy import ndimage as ndi

from histoseg.types import Box

GENERATOR_VERSION = 1
MPP = 0.25  # level-0 microns per pixel (40x)
MAGNIFICATION = 40.0
CLASS_NAMES = ("epithelial", "lymphocyte", "stromal", "other")
EPI, LYM, STR, OTH = 1, 2, 3, 4

# Optical-density stain vectors (unit length): hematoxylin from Ruifrok & Johnston (as in
# histoseg.postprocess.hematoxylin and skimage.color.rgb2hed); eosin is the widely used Macenko reference
# vector, which gives the pink (not magenta) of real eosin.
H_VEC = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
E_VEC = np.array([0.2159, 0.8012, 0.5581]) / np.linalg.norm([0.2159, 0.8012, 0.5581])
BG_OD = np.array([0.050, 0.054, 0.060])  # glass + mountant: background ~ (242, 241, 240)

DEFAULT_SIZE = 4096
LR = 8  # level-0 px per cell of the slowly varying fields
NOISE_TILE = 128  # side of the seeded noise tiles
STRIP = 512  # rows rendered at once

# Compartments (uint8 map at level 0); nuclei live in the separate label map.
C_STROMA, C_CYTO, C_LUMEN, C_VESSEL, C_RBC, C_RBC_PALE = 0, 1, 2, 3, 4, 5
# Base (H, E) optical densities per compartment; stroma is replaced by its textured field.
_COMP_H = np.array([0.0, 0.11, 0.01, 0.01, 0.04, 0.03], np.float32)
_COMP_E = np.array([0.0, 0.34, 0.025, 0.10, 1.05, 0.72], np.float32)

# Noise streams (independent seeded tile families).
_S_FIBRE, _S_CHROM_FINE, _S_CHROM_COARSE, _S_BUNDLE, _S_LUMA, _S_CHROMA = range(1, 7)
_HARMONICS = np.array([2.0, 3.0, 4.0, 5.0])

_PSF_SIGMA = 0.85  # point-spread blur, px
_FIBRE_SIGMAS = (9.0, 1.3)  # along / across the fibre, px
_MARGIN_BLUR = 4  # radius of the PSF kernel
_MARGIN_TEX = 28  # radius of the largest texture kernel
_ORIENTS = tuple(k * math.pi / 6 for k in range(6))  # fibre kernel directions


# ----------------------------------------------------------------------------------------------------------
# Small numeric helpers
# ----------------------------------------------------------------------------------------------------------


def _ksize(sigma: float) -> int:
    return 2 * math.ceil(3.0 * sigma) + 1


def _gauss(a: np.ndarray, sigma: float) -> np.ndarray:
    k = _ksize(sigma)
    return cv2.GaussianBlur(a, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def _gauss_unit(sigma: float) -> float:
    """Std of unit-variance white noise after ``_gauss`` (to renormalise textures to unit std)."""
    k1 = cv2.getGaussianKernel(_ksize(sigma), sigma, cv2.CV_64F).ravel()
    return float(np.sum(k1**2))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Unit-std smooth noise for the small global (low-resolution) fields."""
    n = _gauss(rng.standard_normal(shape), sigma)
    return (n - n.mean()) / max(float(n.std()), 1e-9)


def _tile_noise(seed: int, stream: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Unit-variance uniform white noise of the global rectangle [y0, y1) x [x0, x1) (may leave the canvas).

    Assembled from tiles seeded by (seed, stream, tile row, tile col): identical values whatever the request.
    """
    t = NOISE_TILE
    out = np.empty((y1 - y0, x1 - x0), np.float32)
    off = 1 << 20  # tile indices may be negative in the margins
    for ty in range(y0 // t, (y1 - 1) // t + 1):
        for tx in range(x0 // t, (x1 - 1) // t + 1):
            rng = np.random.default_rng([seed, stream, ty + off, tx + off])
            tile = rng.random((t, t), dtype=np.float32)
            ya, yb = max(y0, ty * t), min(y1, (ty + 1) * t)
            xa, xb = max(x0, tx * t), min(x1, (tx + 1) * t)
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = tile[ya - ty * t : yb - ty * t, xa - tx * t : xb - tx * t]
    out -= 0.5
    out *= math.sqrt(12.0)
    return out


def _upsample(field: np.ndarray, y0: int, y1: int, width: int, interp: int = cv2.INTER_LINEAR) -> np.ndarray:
    """A low-resolution field (cell = LR px) interpolated at level-0 pixel centres of rows [y0, y1)."""
    xs = ((np.arange(width, dtype=np.float32) + 0.5) / LR - 0.5).astype(np.float32)
    ys = ((np.arange(y0, y1, dtype=np.float32) + 0.5) / LR - 0.5).astype(np.float32)
    mx = np.broadcast_to(xs[None, :], (y1 - y0, width))
    my = np.broadcast_to(ys[:, None], (y1 - y0, width))
    return cv2.remap(field.astype(np.float32), mx, my, interp, borderMode=cv2.BORDER_REPLICATE)


def _sample_lr(field: np.ndarray, x: float, y: float) -> float:
    """Bilinear value of a low-resolution field at one level-0 point."""
    u = min(max(x / LR - 0.5, 0.0), field.shape[1] - 1.0)
    v = min(max(y / LR - 0.5, 0.0), field.shape[0] - 1.0)
    i0, j0 = int(v), int(u)
    i1, j1 = min(i0 + 1, field.shape[0] - 1), min(j0 + 1, field.shape[1] - 1)
    fv, fu = v - i0, u - j0
    top = field[i0, j0] * (1 - fu) + field[i0, j1] * fu
    bot = field[i1, j0] * (1 - fu) + field[i1, j1] * fu
    return float(top * (1 - fv) + bot * fv)


@dataclass(frozen=True)
class _Star:
    """Ellipse, semi-axes (a, b) rotated by theta, radius scaled by ``1 + sum amp_k cos(k t + ph_k)``."""

    cx: float
    cy: float
    a: float
    b: float
    theta: float
    amps: np.ndarray
    phases: np.ndarray

    @property
    def reach(self) -> float:
        return max(self.a, self.b) * (1.0 + float(np.abs(self.amps).sum()))

    def polar(self, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised radius rho and boundary lim at pixel centres (inside where rho <= lim)."""
        dx = xs + 0.5 - self.cx
        dy = ys + 0.5 - self.cy
        c, s = math.cos(self.theta), math.sin(self.theta)
        un = (dx * c + dy * s) / self.a
        vn = (-dx * s + dy * c) / self.b
        rho = np.hypot(un, vn)
        # lim = 1 + sum_k amp_k cos(k t + ph_k) = 1 + Re(sum_k amp_k e^{i ph_k} z^k), z = e^{i t} (Horner).
        z = (un + 1j * vn) / np.where(rho > 0, rho, 1.0)
        q = self.amps * np.exp(1j * self.phases)
        poly = z * z * (q[0] + z * (q[1] + z * (q[2] + z * q[3])))
        return rho, 1.0 + poly.real

    def point(self, t: float, frac: float) -> tuple[float, float]:
        """Level-0 point at normalised angle t and fraction ``frac`` of the boundary radius."""
        lim = 1.0 + float(np.sum(self.amps * np.cos(_HARMONICS * t + self.phases)))
        un, vn = frac * lim * math.cos(t), frac * lim * math.sin(t)
        u, v = self.a * un, self.b * vn
        c, s = math.cos(self.theta), math.sin(self.theta)
        return self.cx + u * c - v * s, self.cy + u * s + v * c


def _rand_star(
    rng: np.random.Generator, cx: float, cy: float, a: float, b: float, theta: float, amp: Sequence[float]
) -> _Star:
    amps = rng.normal(0.0, 1.0, 4) * np.asarray(amp, np.float64)
    return _Star(cx, cy, a, b, theta, amps, rng.uniform(0, 2 * np.pi, 4))


# ----------------------------------------------------------------------------------------------------------
# Scene: tissue outline, compartments and nuclei, all global
# ----------------------------------------------------------------------------------------------------------


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


class _Placer:
    """Dart-throwing of nuclei into the global label map with overlap rules."""

    def __init__(self, width: int, height: int, comp: np.ndarray, safe_lr: np.ndarray):
        self.w, self.h = width, height
        self.comp = comp
        self.safe_lr = safe_lr
        self.labels = np.zeros((height, width), np.uint32)
        self.nuc_h = np.zeros((height, width), np.float16)
        self.classes: list[int] = []
        self.centroids: list[tuple[float, float]] = []
        self.fine: list[float] = [0.0]
        self.coarse: list[float] = [0.0]
        self._k3 = np.ones((3, 3), np.uint8)

    def in_tissue(self, x: float, y: float) -> bool:
        i, j = int(y // LR), int(x // LR)
        return 0 <= i < self.safe_lr.shape[0] and 0 <= j < self.safe_lr.shape[1] and bool(self.safe_lr[i, j])

    def place(
        self,
        rng: np.random.Generator,
        cls: int,
        x: float,
        y: float,
        *,
        allowed: tuple[int, ...] = (C_STROMA,),
        theta: float | None = None,
        touch: float = 0.1,
        kind: str = "",
    ) -> bool:
        """Try one nucleus of class ``cls`` centred near (x, y); True when it was placed."""
        if not self.in_tissue(x, y):
            return False
        xi, yi = int(x), int(y)
        if not (0 <= xi < self.w and 0 <= yi < self.h) or self.labels[yi, xi]:
            return False
        if self.comp[yi, xi] not in allowed:
            return False
        star, prof = _nucleus_params(rng, cls, theta, kind)
        star = _Star(x, y, star.a, star.b, star.theta, star.amps, star.phases)
        r = int(math.ceil(star.reach)) + 2
        x0, y0, x1, y1 = int(x) - r, int(y) - r, int(x) + r + 1, int(y) + r + 1
        if x0 < 0 or y0 < 0 or x1 > self.w or y1 > self.h:
            return False
        ys, xs = np.ogrid[y0:y1, x0:x1]
        rho, lim = star.polar(ys.astype(np.float64), xs.astype(np.float64))
        mask = rho <= lim
        area = int(mask.sum())
        if area < 20:
            return False
        comp = self.comp[y0:y1, x0:x1]
        ok = np.zeros(256, bool)
        ok[list(allowed)] = True
        if not ok[comp[mask]].all():
            return False
        lab = self.labels[y0:y1, x0:x1]
        taken = lab != 0
        if rng.random() < touch:  # may abut: clip by the nuclei already there (<= 8 % of its area)
            over = int(np.count_nonzero(taken & mask))
            if over > 0.08 * area:
                return False
            mask &= ~taken
            if over and cv2.connectedComponents(mask.astype(np.uint8), connectivity=4)[0] != 2:
                return False
        else:  # keep a 1-px gap
            grown = cv2.dilate(mask.astype(np.uint8), self._k3).astype(bool)
            if (taken & grown).any():
                return False
        iy, ix = np.nonzero(mask)
        cy, cx = float(iy.mean()) + y0 + 0.5, float(ix.mean()) + x0 + 0.5
        if not mask[int(cy) - y0, int(cx) - x0]:
            return False
        # Hematoxylin profile: darker rim (chromatin on the membrane), paler interior for vesicular nuclei.
        pad = np.pad(mask.astype(np.uint8), 1)
        d = cv2.distanceTransform(pad, cv2.DIST_L2, 3)[1:-1, 1:-1]
        base, interior, rim_w = prof["h"], prof["interior"], prof["rim_w"]
        hmap = base * (interior + (1.0 - interior) * np.exp(-(d - 0.5) / rim_w))
        for _ in range(int(prof["nucleoli"])):
            t = rng.uniform(0, 2 * np.pi)
            px, py = star.point(t, rng.uniform(0.0, 0.45))
            rr = rng.uniform(*prof["nucleolus_r"])
            dn = np.hypot(xs + 0.5 - px, ys + 0.5 - py)
            hmap = hmap + prof["nucleolus_h"] * np.clip(rr + 0.5 - dn, 0.0, 1.0)
        nid = len(self.classes) + 1
        lab[mask] = nid
        self.nuc_h[y0:y1, x0:x1][mask] = hmap[mask].astype(np.float16)
        self.classes.append(cls)
        self.centroids.append((cx, cy))
        self.fine.append(prof["fine"])
        self.coarse.append(prof["coarse"])
        return True


def _nucleus_params(rng: np.random.Generator, cls: int, theta: float | None, kind: str) -> tuple[_Star, dict[str, Any]]:
    """Shape (in px at 0.25 µm/px) and staining of one nucleus of class ``cls``."""
    th = rng.uniform(0, np.pi) if theta is None else theta
    u = rng.uniform
    prof: dict[str, Any] = {"nucleoli": 0, "nucleolus_r": (2.0, 3.0), "nucleolus_h": 0.0, "rim_w": 2.5}
    if cls == EPI:
        if kind == "tumour":  # pleomorphic, vesicular, prominent nucleoli: 9-14 µm
            a = u(18.0, 28.0)
            star = _rand_star(rng, 0, 0, a, a * u(0.62, 0.95), th, (0.07, 0.05, 0.03, 0.02))
            prof.update(h=u(1.0, 1.45), interior=u(0.5, 0.7), fine=0.28, coarse=0.16)
            prof.update(nucleoli=rng.choice([0, 1, 1, 1, 2, 2, 3]), nucleolus_r=(2.2, 4.0), nucleolus_h=0.9)
        else:  # glandular, columnar (long axis along the radius): 8-12 µm
            a = u(17.0, 24.0)
            star = _rand_star(rng, 0, 0, a, a * u(0.55, 0.78), th, (0.05, 0.035, 0.02, 0.015))
            prof.update(h=u(1.1, 1.5), interior=u(0.6, 0.8), fine=0.25, coarse=0.12)
            prof.update(nucleoli=rng.choice([0, 0, 1, 1, 2]), nucleolus_r=(1.8, 3.0), nucleolus_h=0.8)
    elif cls == LYM:  # small, round, dark, clumped: 6-8 µm
        a = u(12.0, 15.5)
        star = _rand_star(rng, 0, 0, a, a * u(0.86, 1.0), th, (0.035, 0.025, 0.015, 0.01))
        prof.update(h=u(1.65, 2.05), interior=u(0.85, 0.95), fine=0.12, coarse=0.16, rim_w=3.0)
    elif cls == STR:  # spindle, 12-20 µm long, 3-4.5 µm wide
        star = _rand_star(rng, 0, 0, u(24.0, 40.0), u(6.5, 9.0), th, (0.03, 0.07, 0.02, 0.02))
        prof.update(h=u(1.25, 1.6), interior=u(0.8, 0.92), fine=0.15, coarse=0.08)
    elif kind == "endothelial":  # flat, along the vessel wall
        star = _rand_star(rng, 0, 0, u(18.0, 26.0), u(6.0, 8.0), th, (0.03, 0.05, 0.02, 0.01))
        prof.update(h=u(1.2, 1.5), interior=0.88, fine=0.15, coarse=0.08)
    else:  # other: plasma-like / irregular, clumped chromatin, 7-11 µm
        a = u(15.0, 21.0)
        star = _rand_star(rng, 0, 0, a, a * u(0.7, 0.95), th, (0.09, 0.06, 0.04, 0.03))
        prof.update(h=u(1.3, 1.7), interior=u(0.7, 0.85), fine=0.15, coarse=0.28)
    return star, prof


def _lr_grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 pixel indices of the low-resolution cell centres (for ``_Star.polar``)."""
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
            star = _rand_star(
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
    field += 0.07 * _smooth_noise(rng, (hl, wl), max(hl, wl) / 16)
    field += 0.035 * _smooth_noise(rng, (hl, wl), 5.0)
    field += 0.015 * _smooth_noise(rng, (hl, wl), 1.5)
    d = np.minimum(np.minimum(ys + 0.5, height - ys - 0.5), np.minimum(xs + 0.5, width - xs - 0.5))
    field -= 0.8 * np.clip(1.0 - d / (0.04 * side), 0.0, 1.0)  # keep the tissue off the slide edge
    coverage = float(np.mean(field > 0))
    thr = 0.0
    if not 0.5 <= coverage <= 0.68:
        thr = float(np.quantile(field, 1.0 - min(max(coverage, 0.5), 0.68)))
    return field.astype(np.float32), thr


def _star_fits(
    star: _Star, safe_lr: np.ndarray, taken_lr: np.ndarray, grow: float, width: int, height: int
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
    ang = 0.5 * np.pi * _smooth_noise(rng, (hl, wl), 40.0) + rng.uniform(0, np.pi)
    orient_lr = np.stack([np.cos(2 * ang), np.sin(2 * ang)]).astype(np.float32)
    stroma_e_lr = (0.38 * np.clip(1 + 0.15 * _smooth_noise(rng, (hl, wl), 12.0), 0.6, 1.4)).astype(np.float32)
    h_scale_lr = (1 + 0.05 * _smooth_noise(rng, (hl, wl), big / 6)).astype(np.float32)
    e_scale_lr = (1 + 0.06 * _smooth_noise(rng, (hl, wl), big / 6)).astype(np.float32)
    cell_lr = 1.0 / (1.0 + np.exp(-1.8 * _smooth_noise(rng, (hl, wl), 18.0)))  # cellularity, 0..1

    comp = np.zeros((height, width), np.uint8)
    taken_lr = np.zeros((hl, wl), bool)  # cells claimed by glands, nests and vessels
    nest_sites, gland_sites = _Sites(safe_lr, cell_lr), _Sites(safe_lr, 0.2 + cell_lr)
    any_sites = _Sites(safe_lr)
    placer = _Placer(width, height, comp, safe_lr)
    scale = tissue_px / 1e6  # tissue area in Mpx

    # Solid epithelial (tumour) nests: crowded pleomorphic nuclei, many touching.
    for _ in range(int(rng.poisson(2.0 * scale)) + 1):
        for _attempt in range(25):
            x, y = nest_sites(rng)
            a = rng.uniform(100.0, 260.0)
            star = _rand_star(rng, x, y, a, a * rng.uniform(0.5, 0.9), rng.uniform(0, np.pi), (0.10, 0.07, 0.05, 0.03))
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
            star = _rand_star(
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
            star = _rand_star(rng, x, y, a, a * rng.uniform(0.35, 1.0), rng.uniform(0, np.pi), (0.06, 0.04, 0.02, 0.01))
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
                rbc = _Star(rx, ry, rr, rr * rng.uniform(0.8, 1.0), rng.uniform(0, np.pi), np.zeros(4), np.zeros(4))
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
            if u > 0.25 + 0.75 * _sample_lr(cell_lr, px, py):
                continue
            theta = None
            if cls == STR:
                c2, s2 = _sample_lr(orient_lr[0], px, py), _sample_lr(orient_lr[1], px, py)
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


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------


def _fibre_kernels() -> list[np.ndarray]:
    """Oriented anisotropic Gaussians every 180/N_ORIENT degrees, scaled to keep unit-variance noise."""
    sl, ss = _FIBRE_SIGMAS
    r = _MARGIN_TEX - 1
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float64)
    out = []
    for phi in _ORIENTS:
        u = xx * math.cos(phi) + yy * math.sin(phi)
        v = -xx * math.sin(phi) + yy * math.cos(phi)
        k = np.exp(-0.5 * (u / sl) ** 2 - 0.5 * (v / ss) ** 2)
        out.append((k / np.sqrt(np.sum(k**2))).astype(np.float32))
    return out


_KERNELS = _fibre_kernels()


def render_rows(scene: Scene, y0: int, y1: int) -> np.ndarray:
    """RGB uint8 rows [y0, y1) of the slide; identical whatever strip they are rendered in."""
    w, seed = scene.width, scene.seed
    ea, eb = max(0, y0 - _MARGIN_BLUR), min(scene.height, y1 + _MARGIN_BLUR)
    m = _MARGIN_TEX

    def noise(stream: int) -> np.ndarray:
        return _tile_noise(seed, stream, ea - m, eb + m, -m, w + m)

    def crop(a: np.ndarray) -> np.ndarray:
        return a[m:-m, m:-m]

    def smooth(stream: int, sigma: float) -> np.ndarray:
        return crop(_gauss(noise(stream), sigma)) / _gauss_unit(sigma)

    # Textures: fibres (blend of oriented kernels following the local fibre direction), bundles, chromatin.
    c2 = _upsample(scene.orient_lr[0], ea, eb, w)
    s2 = _upsample(scene.orient_lr[1], ea, eb, w)
    fn = noise(_S_FIBRE)
    fib = np.zeros((eb - ea, w), np.float32)
    norm = np.zeros((eb - ea, w), np.float32)
    for k, phi in zip(_KERNELS, _ORIENTS, strict=True):
        wk = np.maximum(c2 * np.float32(math.cos(2 * phi)) + s2 * np.float32(math.sin(2 * phi)), 0) ** 4
        fib += crop(cv2.filter2D(fn, -1, k, borderType=cv2.BORDER_REFLECT)) * wk
        norm += wk * wk
    fib /= np.sqrt(norm) + np.float32(1e-6)
    del fn, norm
    bundle = smooth(_S_BUNDLE, 5.0)
    fine = smooth(_S_CHROM_FINE, 0.7)
    coarse = smooth(_S_CHROM_COARSE, 1.8)

    comp = scene.comp[ea:eb]
    lab = scene.labels[ea:eb]
    nuc = lab != 0

    # Stroma: eosin with fibre texture and clear spaces between bundles.
    tex = 0.55 * fib + 0.35 * bundle
    e_str = _upsample(scene.stroma_e_lr, ea, eb, w) * np.clip(1.0 + 0.3 * tex, 0.1, 2.0)
    e_str *= 0.45 + 0.55 * np.clip((tex + 1.9) / 0.5, 0.0, 1.0)
    h_str = 0.045 + 0.012 * fib
    stroma = comp == C_STROMA
    h = np.where(stroma, h_str, _COMP_H[comp])
    e = np.where(stroma, e_str, _COMP_E[comp])
    cyto = comp == C_CYTO
    cyto_tex = np.clip(1.0 + 0.12 * coarse + 0.12 * bundle, 0.5, 1.5)
    h = np.where(cyto, h * cyto_tex, h)
    e = np.where(cyto, e * cyto_tex, e)

    # Tissue presence (soft outline); nuclei are always tissue.
    tis = _upsample(scene.tissue_lr, ea, eb, w, cv2.INTER_CUBIC) + np.float32(0.006) * bundle
    alpha = np.clip((tis - scene.tissue_thr) / 0.003 + 0.5, 0.0, 1.0)
    alpha = np.maximum(alpha, nuc.astype(np.float32))
    h *= alpha
    e *= alpha

    # Nuclei: stamped hematoxylin profile with chromatin texture, light eosin counterstain.
    hn = scene.nuc_h[ea:eb].astype(np.float32) * (1.0 + fine * scene.chrom_fine[lab] + coarse * scene.chrom_coarse[lab])
    h = np.where(nuc, np.maximum(hn, 0.05), h)
    e = np.where(nuc, 0.3 * (1.0 + 0.15 * fine), e)

    h *= _upsample(scene.h_scale_lr, ea, eb, w)
    e *= _upsample(scene.e_scale_lr, ea, eb, w)

    # Beer-Lambert composition, point-spread blur.
    lin: np.ndarray = np.empty((eb - ea, w, 3), np.float32)
    for ch in range(3):
        od = h * np.float32(H_VEC[ch]) + e * np.float32(E_VEC[ch]) + np.float32(BG_OD[ch])
        lin[..., ch] = np.exp(-od) * np.float32(255.0)
    del h, e
    ks = 2 * _MARGIN_BLUR + 1
    lin = cv2.GaussianBlur(lin, (ks, ks), sigmaX=_PSF_SIGMA, sigmaY=_PSF_SIGMA, borderType=cv2.BORDER_REFLECT)
    rgb = [lin[y0 - ea : y0 - ea + (y1 - y0), :, ch] for ch in range(3)]

    # Sensor and JPEG-like noise: per-pixel luminance, 2x2-block chroma (as with 4:2:0 subsampling).
    luma = _tile_noise(seed, _S_LUMA, y0, y1, 0, w) * np.float32(1.4)
    hy0, hy1 = y0 // 2, (y1 + 1) // 2
    hw = (w + 1) // 2
    chroma = []
    for s in (_S_CHROMA, _S_CHROMA + 16):
        cn = _tile_noise(seed, s, hy0, hy1, 0, hw)
        cn = np.repeat(np.repeat(cn, 2, axis=0), 2, axis=1)
        chroma.append(cn[y0 - 2 * hy0 : y0 - 2 * hy0 + (y1 - y0), :w] * np.float32(1.1))
    cr, cb = chroma
    noisy = np.stack([rgb[0] + luma + cr, rgb[1] + luma - 0.5 * (cr + cb), rgb[2] + luma + cb], axis=-1)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def render(scene: Scene, strip: int = STRIP) -> np.ndarray:
    """The whole slide, (H, W, 3) uint8, rendered in row strips."""
    out = np.empty((scene.height, scene.width, 3), np.uint8)
    for y0 in range(0, scene.height, strip):
        y1 = min(scene.height, y0 + strip)
        out[y0:y1] = render_rows(scene, y0, y1)
    return out


class RowSource:
    """``Box -> pixels`` source for the TIFF writer: renders whole-width strips on demand (one cached)."""

    def __init__(self, scene: Scene, strip: int = STRIP):
        self.scene = scene
        self.strip = strip
        self.y0 = self.y1 = 0
        self.rows = np.zeros((0, scene.width, 3), np.uint8)

    def __call__(self, box: Box) -> np.ndarray:
        y0, y1 = max(0, box.y), min(self.scene.height, box.y1)
        if not (self.y0 <= y0 and y1 <= self.y1):
            self.y0, self.y1 = y0, min(self.scene.height, max(y1, y0 + self.strip))
            self.rows = render_rows(self.scene, self.y0, self.y1)
        return self.rows[y0 - self.y0 : y1 - self.y0, max(0, box.x) : box.x1]


def generate(width: int, height: int, seed: int = 0) -> tuple[Scene, np.ndarray]:
    """Scene (with ground truth) and RGB pixels of a synthetic slide."""
    scene = build_scene(width, height, seed)
    return scene, render(scene)


# ----------------------------------------------------------------------------------------------------------
# Files and command line
# ----------------------------------------------------------------------------------------------------------

Writer = Callable[..., Any]


def _histoseg_writer() -> Writer:
    from histoseg.io import write_pyramidal_tiff

    fn: Writer = write_pyramidal_tiff
    return fn


def summary(scene: Scene) -> dict[str, Any]:
    """The JSON description written beside the slide."""
    counts = np.bincount(scene.classes, minlength=len(CLASS_NAMES) + 1)
    return {
        "generator": "sample_data/make_sample.py",
        "generator_version": GENERATOR_VERSION,
        "width": scene.width,
        "height": scene.height,
        "size": [scene.width, scene.height],
        "mpp": MPP,
        "magnification": MAGNIFICATION,
        "seed": scene.seed,
        "nucleus_count": int(scene.classes.size),
        "class_names": {str(i + 1): n for i, n in enumerate(CLASS_NAMES)},
        "class_counts": {n: int(counts[i + 1]) for i, n in enumerate(CLASS_NAMES)},
        "tissue_fraction": round(scene.tissue_fraction, 4),
        "centroid_convention": "(x, y) level-0 px; pixel j spans [j, j+1) (mean index + 0.5)",
        "stain_vectors": {"hematoxylin": H_VEC.round(4).tolist(), "eosin": E_VEC.round(4).tolist()},
    }


def write_sample(
    out: str | Path, width: int, height: int, seed: int = 0, *, writer: Writer | None = None
) -> dict[str, Any]:
    """Generate and write ``out`` (TIFF), ``out.npz`` and ``out.json``; returns the JSON dictionary."""
    out = Path(out)
    write = writer if writer is not None else _histoseg_writer()
    out.parent.mkdir(parents=True, exist_ok=True)
    scene = build_scene(width, height, seed)
    write(out, RowSource(scene), (width, height), MPP, magnification=MAGNIFICATION)
    np.savez_compressed(
        out.with_suffix(".npz"),
        labels=scene.labels,
        classes=scene.classes,
        centroids=scene.centroids,
        class_names=np.array(CLASS_NAMES),
    )
    meta = summary(scene)
    meta["files"] = {"image": out.name, "ground_truth": out.with_suffix(".npz").name}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or WxH, got {text!r}") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) < 256:
        raise argparse.ArgumentTypeError(f"size must be N or WxH with sides >= 256, got {text!r}")
    return vals[0], vals[1]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument(
        "out",
        nargs="?",
        default=str(Path(__file__).resolve().parent / "sample.tif"),
        help="output TIFF (default: sample_data/sample.tif); .npz and .json are written beside it",
    )
    ap.add_argument(
        "--size",
        type=_parse_size,
        default=(DEFAULT_SIZE, DEFAULT_SIZE),
        help="side in px, or WxH (default 4096)",
    )
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    meta = write_sample(args.out, args.size[0], args.size[1], args.seed)
    dt = time.perf_counter() - t0
    print(
        f"wrote {args.out} ({meta['width']}x{meta['height']} px at {MPP} µm/px, seed {meta['seed']}, "
        f"{meta['nucleus_count']} nuclei, tissue {meta['tissue_fraction']:.0%}) in {dt:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
