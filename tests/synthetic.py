"""Small synthetic slides with known nuclei, written with the project's own pyramid writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histoseg.io import write_pyramidal_tiff


def random_nuclei(shape: tuple[int, int], n: int, seed: int, r_range: tuple[int, int] = (4, 9)) -> np.ndarray:
    """Instance map of ``n`` random ellipses; later ones may touch (and overwrite) earlier ones."""
    rng = np.random.default_rng(seed)
    h, w = shape
    lab = np.zeros(shape, np.int32)
    yy, xx = np.indices(shape)
    k = 0
    for _ in range(n):
        cy, cx = rng.uniform(10, h - 10), rng.uniform(10, w - 10)
        ry, rx = rng.uniform(*r_range), rng.uniform(*r_range)
        t = rng.uniform(0, np.pi)
        y0, y1 = int(max(0, cy - 12)), int(min(h, cy + 12))
        x0, x1 = int(max(0, cx - 12)), int(min(w, cx + 12))
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        u = dx * np.cos(t) + dy * np.sin(t)
        v = -dx * np.sin(t) + dy * np.cos(t)
        m = (u / rx) ** 2 + (v / ry) ** 2 <= 1
        if (lab[y0:y1, x0:x1][m] > 0).mean() > 0.2:  # mostly free space only: nuclei touch, never nest
            continue
        k += 1
        lab[y0:y1, x0:x1][m & (lab[y0:y1, x0:x1] == 0)] = k
    return lab


def render(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """H&E-ish RGB: pink tissue, purple nuclei, a white glass margin on the right."""
    rng = np.random.default_rng(seed)
    h, w = labels.shape
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (236, 170, 200)
    img[labels > 0] = (95, 60, 150)
    noise = rng.integers(-6, 7, size=(h, w, 1))
    img = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    img[:, int(w * 0.85) :] = 245
    return img


def write_slide(path: Path, labels: np.ndarray, mpp: float) -> Path:
    lab = labels.copy()
    lab[:, int(labels.shape[1] * 0.85) :] = 0
    write_pyramidal_tiff(path, render(lab), (lab.shape[1], lab.shape[0]), mpp, compression="zlib")
    return path
