"""Shared vocabulary and primitives of the synthetic slide generator (see ``make_sample.py``).

Scale and classes, the compartment codes of the scene, the low-resolution grid, small smoothing helpers and
the star-shaped ellipse (``Star``) that outlines tissue pieces, glands, nests, vessels and nuclei.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

MPP = 0.25  # level-0 microns per pixel (40x)
MAGNIFICATION = 40.0
CLASS_NAMES = ("epithelial", "lymphocyte", "stromal", "other")
EPI, LYM, STR, OTH = 1, 2, 3, 4
LR = 8  # level-0 px per cell of the slowly varying fields

# Compartments (uint8 map at level 0); nuclei live in the separate label map.
C_STROMA, C_CYTO, C_LUMEN, C_VESSEL, C_RBC, C_RBC_PALE = 0, 1, 2, 3, 4, 5

_HARMONICS = np.array([2.0, 3.0, 4.0, 5.0])  # radial harmonics of a Star's outline


def _ksize(sigma: float) -> int:
    return 2 * math.ceil(3.0 * sigma) + 1


def gauss(a: np.ndarray, sigma: float) -> np.ndarray:
    k = _ksize(sigma)
    return cv2.GaussianBlur(a, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def gauss_unit(sigma: float) -> float:
    """Std of unit-variance white noise after ``gauss`` (to renormalise textures to unit std)."""
    k1 = cv2.getGaussianKernel(_ksize(sigma), sigma, cv2.CV_64F).ravel()
    return float(np.sum(k1**2))


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Unit-std smooth noise for the small global (low-resolution) fields."""
    n = gauss(rng.standard_normal(shape), sigma)
    return (n - n.mean()) / max(float(n.std()), 1e-9)


def sample_lr(field: np.ndarray, x: float, y: float) -> float:
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
class Star:
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


def rand_star(
    rng: np.random.Generator, cx: float, cy: float, a: float, b: float, theta: float, amp: Sequence[float]
) -> Star:
    amps = rng.normal(0.0, 1.0, 4) * np.asarray(amp, np.float64)
    return Star(cx, cy, a, b, theta, amps, rng.uniform(0, 2 * np.pi, 4))
