"""Nuclei: per-class shape and staining, and dart-throwing placement into the global label map.

Nuclei are star-shaped ellipses (random radial harmonics) placed before any pixel is rendered, so no nucleus
is cut by a tile seam; most keep a 1-px gap, a fraction may touch/abut like in real tissue (the later one is
clipped).  Each nucleus stamps its hematoxylin profile (vesicular rim, nucleoli) into a global map.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

try:  # imported from the package (python -m sample_data.make_sample, tests)
    from sample_data.synth_common import C_STROMA, EPI, LR, LYM, STR, Star, rand_star
except ModuleNotFoundError:  # run as python sample_data/make_sample.py: this folder is sys.path[0]
    from synth_common import C_STROMA, EPI, LR, LYM, STR, Star, rand_star


class Placer:
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
        star = Star(x, y, star.a, star.b, star.theta, star.amps, star.phases)
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


def _nucleus_params(rng: np.random.Generator, cls: int, theta: float | None, kind: str) -> tuple[Star, dict[str, Any]]:
    """Shape (in px at 0.25 µm/px) and staining of one nucleus of class ``cls``."""
    th = rng.uniform(0, np.pi) if theta is None else theta
    u = rng.uniform
    prof: dict[str, Any] = {"nucleoli": 0, "nucleolus_r": (2.0, 3.0), "nucleolus_h": 0.0, "rim_w": 2.5}
    if cls == EPI:
        if kind == "tumour":  # pleomorphic, vesicular, prominent nucleoli: 9-14 µm
            a = u(18.0, 28.0)
            star = rand_star(rng, 0, 0, a, a * u(0.62, 0.95), th, (0.07, 0.05, 0.03, 0.02))
            prof.update(h=u(1.0, 1.45), interior=u(0.5, 0.7), fine=0.28, coarse=0.16)
            prof.update(nucleoli=rng.choice([0, 1, 1, 1, 2, 2, 3]), nucleolus_r=(2.2, 4.0), nucleolus_h=0.9)
        else:  # glandular, columnar (long axis along the radius): 8-12 µm
            a = u(17.0, 24.0)
            star = rand_star(rng, 0, 0, a, a * u(0.55, 0.78), th, (0.05, 0.035, 0.02, 0.015))
            prof.update(h=u(1.1, 1.5), interior=u(0.6, 0.8), fine=0.25, coarse=0.12)
            prof.update(nucleoli=rng.choice([0, 0, 1, 1, 2]), nucleolus_r=(1.8, 3.0), nucleolus_h=0.8)
    elif cls == LYM:  # small, round, dark, clumped: 6-8 µm
        a = u(12.0, 15.5)
        star = rand_star(rng, 0, 0, a, a * u(0.86, 1.0), th, (0.035, 0.025, 0.015, 0.01))
        prof.update(h=u(1.65, 2.05), interior=u(0.85, 0.95), fine=0.12, coarse=0.16, rim_w=3.0)
    elif cls == STR:  # spindle, 12-20 µm long, 3-4.5 µm wide
        star = rand_star(rng, 0, 0, u(24.0, 40.0), u(6.5, 9.0), th, (0.03, 0.07, 0.02, 0.02))
        prof.update(h=u(1.25, 1.6), interior=u(0.8, 0.92), fine=0.15, coarse=0.08)
    elif kind == "endothelial":  # flat, along the vessel wall
        star = rand_star(rng, 0, 0, u(18.0, 26.0), u(6.0, 8.0), th, (0.03, 0.05, 0.02, 0.01))
        prof.update(h=u(1.2, 1.5), interior=0.88, fine=0.15, coarse=0.08)
    else:  # other: plasma-like / irregular, clumped chromatin, 7-11 µm
        a = u(15.0, 21.0)
        star = rand_star(rng, 0, 0, a, a * u(0.7, 0.95), th, (0.09, 0.06, 0.04, 0.03))
        prof.update(h=u(1.3, 1.7), interior=u(0.7, 0.85), fine=0.15, coarse=0.28)
    return star, prof
