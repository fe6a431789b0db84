"""Pixel arithmetic shared by readers and writer: white compositing, block means, global-grid bilinear.

Every function here computes each output pixel from its own source pixels with integer arithmetic or from
coordinates derived from *global* indices, so a result never depends on where a box starts: the property
``read_plane`` needs for translation-exact reads (big box cropped == small box read, bit for bit).
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

U8 = npt.NDArray[np.uint8]

INTER_BITS = 5  # OpenCV's fixed-point sub-pixel precision for remap (1/32 pixel)
_INTER_TAB = 1 << INTER_BITS
_MAX_REMAP_CHUNK = 4096  # output pixels per axis per cv2.remap call: keeps source indices inside int16


def white(h: int, w: int) -> U8:
    """An (h, w, 3) white canvas: the value of every pixel outside a slide."""
    return np.full((max(h, 0), max(w, 0), 3), 255, np.uint8)


def to_rgb(arr: np.ndarray) -> U8:
    """Any 2-D/3-D uint8 array (gray, gray+alpha, RGB, RGBA) to RGB; alpha composited over white.

    Transparent pixels become white so that OpenSlide's out-of-bounds area and RGBA images look like glass.
    """
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    c = a.shape[2]
    if c == 3:
        return np.ascontiguousarray(a)
    if c == 1:
        return np.ascontiguousarray(np.repeat(a, 3, axis=2))
    if c == 2:
        a = np.concatenate([np.repeat(a[:, :, :1], 3, axis=2), a[:, :, 1:]], axis=2)
    elif c != 4:
        raise ValueError(f"cannot convert {c} channels to RGB")
    rgb = a[:, :, :3].astype(np.uint32)
    alpha = a[:, :, 3:4].astype(np.uint32)
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def block_mean(arr: U8, fy: int, fx: int) -> U8:
    """Mean of aligned ``fy x fx`` blocks, rounded half up (integer arithmetic, exact and deterministic).

    ``arr`` height and width must be multiples of ``fy`` and ``fx``.
    """
    if fy == 1 and fx == 1:
        return arr
    h, w = arr.shape[:2]
    if h % fy or w % fx:
        raise ValueError(f"shape {arr.shape[:2]} is not a multiple of ({fy}, {fx})")
    n = fy * fx
    acc_t = np.uint16 if n <= 257 else np.uint32  # 255 * 257 fits in uint16
    acc = np.zeros((h // fy, w // fx, arr.shape[2]), acc_t)
    for dy in range(fy):
        for dx in range(fx):
            acc += arr[dy::fy, dx::fx]
    acc += n // 2
    acc //= n
    return acc.astype(np.uint8)


def global_taps(start: int, n: int, ratio: float) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Bilinear taps of output pixels ``start .. start+n-1``, ``ratio`` source pixels per output pixel.

    Pixel centres map as ``u = (i + 0.5) * ratio - 0.5``; ``u`` is quantised to 1/32 from the global index
    ``i``, so the same output pixel always gets the same (integer tap, fraction) whatever box it is read in.
    Returns ``(floor tap, fraction in 0..31)``.
    """
    i = np.arange(start, start + n, dtype=np.float64)
    q = np.floor((i + 0.5) * ratio * _INTER_TAB - 0.5 * _INTER_TAB + 0.5).astype(np.int64)
    return q >> INTER_BITS, q & (_INTER_TAB - 1)


def remap_bilinear(
    src: U8,
    ix: npt.NDArray[np.int64],
    fx: npt.NDArray[np.int64],
    iy: npt.NDArray[np.int64],
    fy: npt.NDArray[np.int64],
) -> U8:
    """Separable-grid bilinear sampling with cv2.remap's fixed-point maps.

    ``ix``/``iy`` are taps local to ``src`` (``tap + 1`` must lie inside it), ``fx``/``fy`` fractions in
    1/32. Fixed-point maps (not float maps) keep the weights exactly those given, hence translation-exact.
    """
    h, w = iy.shape[0], ix.shape[0]
    out = np.empty((h, w, src.shape[2]), np.uint8)
    for y0 in range(0, h, _MAX_REMAP_CHUNK):
        y1 = min(h, y0 + _MAX_REMAP_CHUNK)
        sy0 = int(iy[y0])
        sy1 = int(iy[y1 - 1]) + 2
        for x0 in range(0, w, _MAX_REMAP_CHUNK):
            x1 = min(w, x0 + _MAX_REMAP_CHUNK)
            sx0 = int(ix[x0])
            sx1 = int(ix[x1 - 1]) + 2
            sub = np.ascontiguousarray(src[sy0:sy1, sx0:sx1])
            m1 = np.empty((y1 - y0, x1 - x0, 2), np.int16)
            m1[:, :, 0] = (ix[x0:x1] - sx0)[None, :]
            m1[:, :, 1] = (iy[y0:y1] - sy0)[:, None]
            m2 = (fy[y0:y1, None] * _INTER_TAB + fx[None, x0:x1]).astype(np.uint16)
            res = cv2.remap(sub, m1, m2, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            out[y0:y1, x0:x1] = res.reshape(y1 - y0, x1 - x0, -1)
    return out
