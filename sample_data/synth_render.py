"""Rendering a scene into RGB pixels, in row strips that never show seams.

Optical densities ``H``, ``E`` from the compartments, fibre texture (oriented smoothed noise) and chromatin
noise, composed by Beer-Lambert ``I = 255 exp(-(H h + E e + bg))``, blurred by a point-spread function and
given sensor/JPEG-like luminance and chroma noise.  Every random texture comes from noise tiles seeded by
``(seed, stream, tile row, tile col)``, so the pixels do not depend on the strip height.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

try:  # imported from the package (python -m sample_data.make_sample, tests)
    from sample_data.synth_common import C_CYTO, C_STROMA, LR, gauss, gauss_unit
    from sample_data.synth_scene import Scene
except ModuleNotFoundError:  # run as python sample_data/make_sample.py: this folder is sys.path[0]
    from synth_common import C_CYTO, C_STROMA, LR, gauss, gauss_unit
    from synth_scene import Scene

from histoseg.types import Box

# Optical-density stain vectors (unit length): hematoxylin from Ruifrok & Johnston (as in
# histoseg.postprocess.hematoxylin and skimage.color.rgb2hed); eosin is the widely used Macenko reference
# vector, which gives the pink (not magenta) of real eosin.
H_VEC = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
E_VEC = np.array([0.2159, 0.8012, 0.5581]) / np.linalg.norm([0.2159, 0.8012, 0.5581])
BG_OD = np.array([0.050, 0.054, 0.060])  # glass + mountant: background ~ (242, 241, 240)

NOISE_TILE = 128  # side of the seeded noise tiles
STRIP = 512  # rows rendered at once

# Base (H, E) optical densities per compartment; stroma is replaced by its textured field.
_COMP_H = np.array([0.0, 0.11, 0.01, 0.01, 0.04, 0.03], np.float32)
_COMP_E = np.array([0.0, 0.34, 0.025, 0.10, 1.05, 0.72], np.float32)

# Noise streams (independent seeded tile families).
_S_FIBRE, _S_CHROM_FINE, _S_CHROM_COARSE, _S_BUNDLE, _S_LUMA, _S_CHROMA = range(1, 7)

_PSF_SIGMA = 0.85  # point-spread blur, px
_FIBRE_SIGMAS = (9.0, 1.3)  # along / across the fibre, px
_MARGIN_BLUR = 4  # radius of the PSF kernel
_MARGIN_TEX = 28  # radius of the largest texture kernel
_ORIENTS = tuple(k * math.pi / 6 for k in range(6))  # fibre kernel directions


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
        return crop(gauss(noise(stream), sigma)) / gauss_unit(sigma)

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
