"""The one reader interface every backend implements, and the resolution logic built on it.

Backends only implement :meth:`SlideReader.read_level` (pixels of one pyramid level, white outside the
image). Everything in physical units (processing planes, thumbnails) is computed here once, so every backend
resamples identically.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from types import TracebackType

import cv2
import numpy as np

from histoseg.errors import MissingMppError
from histoseg.io.resample import U8, block_mean, global_taps, remap_bilinear, white
from histoseg.types import Box, SlideMeta

SCALE_SNAP_TOLERANCE = 0.02  # plane_scale snaps to an integer within 2 %
LEVEL_TOLERANCE = 0.01  # a level may be 1 % coarser than asked; a factor within 1 % of k counts as k
_THUMB_STRIP_BYTES = 64 << 20  # memory bound of one strip read while building a thumbnail
_PLANE_CHUNK_BYTES = 256 << 20  # read_plane splits boxes whose source pixels would exceed this


class SlideReader(ABC):
    """A whole-slide image opened for reading; thread-safe for concurrent reads.

    Coordinates follow ``histoseg.types``: level-0 pixels of the full image, half-open boxes, arrays
    indexed ``[y, x]``. All pixels are RGB uint8; anything outside the image (or transparent) is white.
    """

    meta: SlideMeta

    @abstractmethod
    def read_level(self, level: int, box: Box) -> U8:
        """Pixels of ``box`` (in that level's pixel coordinates) as (box.h, box.w, 3) uint8, white outside."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends have something to release
        """Release file handles; the reader must not be used afterwards."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        m = self.meta
        return f"{type(self).__name__}({m.path!r}, levels={m.level_dimensions}, mpp={m.mpp})"

    # -- geometry ---------------------------------------------------------------------------------------

    def level_ratio(self, level: int) -> tuple[float, float]:
        """Actual level-0 pixels per pixel of ``level`` along (x, y): real pyramids are not exact powers."""
        w0, h0 = self.meta.level_dimensions[0]
        w, h = self.meta.level_dimensions[level]
        return w0 / w, h0 / h

    def plane_levels(self) -> tuple[int, ...]:
        """Levels whose pixels ``read_level`` returns exactly (used by ``read_plane``); default: all."""
        return tuple(range(self.meta.level_count))

    def plane_scale(self, mpp: float) -> float:
        """Level-0 pixels per processing-plane pixel at ``mpp`` µm/px, snapped to an integer within 2 %.

        Snapping makes the common cases (0.499 µm slide read at 0.5 µm; 0.2456 µm read at 0.5 µm) exact
        integer box filters instead of a slightly-off bilinear resampling.
        """
        if self.meta.mpp is None:
            raise MissingMppError(
                f"{self.meta.path}: the slide has no pixel size (mpp) in its metadata; "
                "pass it with --slide-mpp (µm per level-0 pixel)"
            )
        if not (mpp > 0 and math.isfinite(mpp)):
            raise ValueError(f"mpp must be a positive number, got {mpp}")
        raw = mpp / self.meta.mpp
        k = round(raw)
        if k >= 1 and abs(raw - k) <= SCALE_SNAP_TOLERANCE * k:
            return float(k)
        return raw

    def plane_shape(self, mpp: float) -> tuple[int, int]:
        """(H, W) of the processing plane at ``mpp``: every level-0 pixel belongs to some plane pixel."""
        s = self.plane_scale(mpp)
        w0, h0 = self.meta.dimensions
        return math.ceil(h0 / s - 1e-9), math.ceil(w0 / s - 1e-9)

    def _level_for(self, scale: float, levels: tuple[int, ...]) -> int:
        """Coarsest level among ``levels`` whose downsample is at most ``scale`` (1 % tolerance)."""
        best = levels[0] if levels else 0
        best_d = 0.0
        for lv in levels:
            d = min(self.level_ratio(lv))
            if d <= scale * (1 + LEVEL_TOLERANCE) and d > best_d:
                best, best_d = lv, d
        return best

    # -- reads in physical units ------------------------------------------------------------------------

    def read_plane(self, box: Box, mpp: float) -> U8:
        """Pixels of ``box`` in processing-plane coordinates at ``mpp`` as (box.h, box.w, 3) uint8.

        Translation-exact: every output pixel is a function of its global plane index only, so reading a
        big box and cropping equals reading the small box. From the coarsest adequate level, the remaining
        factor is applied as an aligned k x k box mean when it is (within 1 %) an integer k, otherwise as
        bilinear sampling on the global grid, after an aligned floor(r) box pre-reduction when r >= 2.
        """
        if box.w <= 0 or box.h <= 0:
            return white(box.h, box.w)
        scale = self.plane_scale(mpp)
        level = self._level_for(scale, self.plane_levels())
        dx, dy = self.level_ratio(level)
        rx, ry = scale / dx, scale / dy
        source_bytes = 3 * box.w * box.h * max(rx, 1.0) * max(ry, 1.0)
        if source_bytes > _PLANE_CHUNK_BYTES and box.h > 1:  # row strips: pixels are independent anyway
            rows = max(1, int(box.h * _PLANE_CHUNK_BYTES / source_bytes))
            strips = [
                self.read_plane(Box(box.x, y, box.w, min(rows, box.y1 - y)), mpp)
                for y in range(box.y, box.y1, rows)
            ]
            return np.concatenate(strips, axis=0)
        kx, ky = round(rx), round(ry)
        if (
            kx >= 1
            and ky >= 1
            and abs(rx - kx) <= LEVEL_TOLERANCE * kx
            and abs(ry - ky) <= LEVEL_TOLERANCE * ky
        ):
            src = self.read_level(level, Box(box.x * kx, box.y * ky, box.w * kx, box.h * ky))
            return block_mean(src, ky, kx)
        px = math.floor(rx) if rx >= 2 else 1
        py = math.floor(ry) if ry >= 2 else 1
        ix, fx = global_taps(box.x, box.w, rx / px)
        iy, fy = global_taps(box.y, box.h, ry / py)
        x0, x1 = int(ix[0]), int(ix[-1]) + 2
        y0, y1 = int(iy[0]), int(iy[-1]) + 2
        src = self.read_level(level, Box(x0 * px, y0 * py, (x1 - x0) * px, (y1 - y0) * py))
        src = block_mean(src, py, px)
        return remap_bilinear(src, ix - x0, fx, iy - y0, fy)

    def read_region(self, box_level0: Box, mpp: float) -> U8:
        """The plane box at ``mpp`` covering ``box_level0`` (level-0 pixels), read with ``read_plane``."""
        s = self.plane_scale(mpp)
        x0 = math.floor(box_level0.x / s)
        y0 = math.floor(box_level0.y / s)
        x1 = math.ceil(box_level0.x1 / s)
        y1 = math.ceil(box_level0.y1 / s)
        return self.read_plane(Box(x0, y0, x1 - x0, y1 - y0), mpp)

    def thumbnail(self, max_size: int = 2048) -> tuple[U8, float]:
        """RGB thumbnail whose longer side is ``max_size`` (or the whole slide if smaller), and its factor.

        The factor is level-0 pixels per thumbnail pixel. Built from the smallest level at least as large as
        the thumbnail, read in strips so memory stays bounded even for single-level slides.
        """
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        w0, h0 = self.meta.dimensions
        t = max(1.0, max(w0, h0) / max_size)
        tw, th = max(1, round(w0 / t)), max(1, round(h0 / t))
        level = self._level_for(t, tuple(range(self.meta.level_count)))
        wl, hl = self.meta.level_dimensions[level]
        k = max(1, math.floor(t / max(self.level_ratio(level))))
        k = min(k, wl, hl)
        small = self._reduced_level(level, k)
        if small.shape[:2] != (th, tw):
            small = np.asarray(cv2.resize(small, (tw, th), interpolation=cv2.INTER_AREA), np.uint8)
        return np.ascontiguousarray(small), t

    def _reduced_level(self, level: int, k: int) -> U8:
        """Whole ``level`` reduced by an aligned k x k block mean (partial edge blocks dropped).

        Read in aligned pieces of at most ``_THUMB_STRIP_BYTES`` source bytes: full-width strips when a
        k-row strip fits, otherwise k-row strips cut into column chunks, so memory stays bounded whatever
        the level's width (the result is the same, block means do not cross pieces).
        """
        wl, hl = self.meta.level_dimensions[level]
        wk, hk = wl // k, hl // k
        block = 3 * k * k  # source bytes of one output pixel
        cols = min(wk, max(1, _THUMB_STRIP_BYTES // block))  # output columns per piece
        rows = max(1, _THUMB_STRIP_BYTES // (block * cols)) if cols == wk else 1  # output rows per piece
        strips: list[U8] = []
        for y in range(0, hk, rows):
            h = min(rows, hk - y)
            pieces = [
                block_mean(self.read_level(level, Box(x * k, y * k, min(cols, wk - x) * k, h * k)), k, k)
                for x in range(0, wk, cols)
            ]
            strips.append(np.concatenate(pieces, axis=1))
        return np.concatenate(strips, axis=0)

    # -- helpers for backends ---------------------------------------------------------------------------

    def _padded(self, level: int, box: Box, fetch: Callable[[Box], U8]) -> U8:
        """White canvas for ``box`` with ``fetch(in-bounds part)`` pasted in: the core of read_level."""
        if not 0 <= level < self.meta.level_count:
            raise ValueError(f"level {level} out of range 0..{self.meta.level_count - 1}")
        wl, hl = self.meta.level_dimensions[level]
        inside = box.intersect(Box(0, 0, wl, hl))
        if inside is not None and inside == box:
            return fetch(box)
        out = white(box.h, box.w)
        if inside is not None:
            out[inside.y - box.y : inside.y1 - box.y, inside.x - box.x : inside.x1 - box.x] = fetch(inside)
        return out


MAX_TAG_MPP = 10.0  # µm/px: larger values recovered from TIFF resolution tags are screen DPI, not microscopy


def tiff_tag_mpp(path: str | os.PathLike[str]) -> float | None:
    """µm per pixel from a TIFF's first-page resolution tags (inch or centimetre units), the way tiffslide
    reads them; None without usable tags or above ``MAX_TAG_MPP`` (the 72/96 dpi of image editors)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            tags = tf.pages.first.tags
            xres, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
            if xres is None or unit is None:
                return None
            num, den = xres.value
            per_unit = num / den if den else 0.0
            unit_um = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
    except Exception:
        return None
    if not unit_um or per_unit <= 0:
        return None
    mpp = unit_um / per_unit
    return mpp if math.isfinite(mpp) and 0 < mpp <= MAX_TAG_MPP else None


def resolve_mpp(metadata_mpp: float | None, user_mpp: float | None) -> tuple[float | None, str]:
    """The mpp to use and its source: the user's value wins, then metadata, else ``(None, "none")``."""
    if user_mpp is not None:
        return float(user_mpp), "user"
    if metadata_mpp is not None and math.isfinite(metadata_mpp) and metadata_mpp > 0:
        return float(metadata_mpp), "metadata"
    return None, "none"


def as_float(value: object) -> float | None:
    """Parse a metadata value as a finite float, else None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(str(value).strip())
    except ValueError:
        return None
    return f if math.isfinite(f) else None


def select_properties(props: dict[str, object], max_len: int = 512) -> dict[str, str]:
    """Backend properties worth keeping in SlideMeta, as strings (no per-level keys, no huge blobs)."""
    out: dict[str, str] = {}
    for k, v in props.items():
        if v is None or ".level[" in k or k.endswith(("ImageDescription", ".comment", "xml")):
            continue
        s = str(v)
        if len(s) <= max_len:
            out[k] = s
    return out
