"""Plain images (PNG, JPEG, BMP, single-page TIFF) as one-level slides, decoded once into memory.

PNG, JPEG and BMP carry no trustworthy physical pixel size (DPI tags describe screens or printers), so
``mpp`` is None unless the user gives it (``--slide-mpp``). A plain TIFF's resolution tags are read as
tiffslide reads them for larger TIFFs (inch/centimetre units, at most ``MAX_TAG_MPP`` µm/px), so a TIFF's
pixel size never depends on which backend its size selects. Alpha is composited over white, gray becomes RGB and
16-bit samples are reduced to their high byte.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from histoseg.errors import CorruptSlideError, ImplausibleSlideError, UnsupportedImageError
from histoseg.io.base import SlideReader, resolve_mpp, tiff_tag_mpp
from histoseg.io.limits import check_expansion, check_tiff_pages
from histoseg.io.resample import U8, to_rgb
from histoseg.types import Box, SlideMeta

TIFF_SUFFIXES = (".tif", ".tiff")


def _is_tiff(path: str) -> bool:
    """Decoder chosen by content, not by name: a PNG named ``.tif`` is a PNG."""
    with open(path, "rb") as f:
        return f.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _to_uint8(a: np.ndarray, path: str) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16:
        return (a >> 8).astype(np.uint8)
    raise UnsupportedImageError(f"{path}: {a.dtype} pixels; histoseg reads 8-bit (or 16-bit) RGB images only")


def _load_tiff(path: str) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages.first
        check_tiff_pages(path, [(int(page.imagewidth), int(page.imagelength), [page])])
        a = page.asarray()
        if page.planarconfig == 2 and a.ndim == 3:  # separate planes: (S, H, W)
            a = np.moveaxis(a, 0, -1)
    return np.asarray(a)


def _load_pil(path: str) -> np.ndarray:
    from PIL import Image

    try:
        im_ctx = Image.open(path)
    except Image.DecompressionBombError as e:
        raise UnsupportedImageError(
            f"{path}: too large for the plain-image reader ({e}); convert it to a pyramidal TIFF"
        ) from e
    with im_ctx as im:
        check_expansion(path, "the image", im.width, im.height, os.path.getsize(path))
        im.load()
        mode = im.mode
        if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            a = np.asarray(im)
            if a.dtype.kind == "f" or a.min(initial=0) < 0 or a.max(initial=0) > 65535:
                raise UnsupportedImageError(f"{path}: {mode} pixels are not supported")
            return a.astype(np.uint16)
        if mode in ("P", "PA"):
            return np.asarray(im.convert("RGBA"))
        if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            return np.asarray(im.convert("RGB"))
        return np.asarray(im)


class ImageReader(SlideReader):
    """One-level slide held in memory; reads are array slices (thread-safe)."""

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        self._path = str(path)
        try:
            raw = _load_tiff(self._path) if _is_tiff(self._path) else _load_pil(self._path)
        except (UnsupportedImageError, ImplausibleSlideError):
            raise
        except Exception as e:
            raise CorruptSlideError(f"{self._path}: cannot decode the image ({e})") from e
        a = _to_uint8(raw, self._path)
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 2, 3, 4)) or a.size == 0:
            raise UnsupportedImageError(f"{self._path}: image of shape {a.shape} is not a 2-D gray/RGB image")
        self._rgb = to_rgb(a)
        self._rgb.flags.writeable = False
        h, w = self._rgb.shape[:2]
        use_mpp, source = resolve_mpp(tiff_tag_mpp(self._path) if _is_tiff(self._path) else None, mpp)
        self.meta = SlideMeta(
            path=self._path,
            backend="image",
            vendor="image",
            level_dimensions=((w, h),),
            level_downsamples=(1.0,),
            mpp=use_mpp,
            mpp_source=source,
        )

    def read_level(self, level: int, box: Box) -> U8:
        return self._padded(level, box, lambda b: self._rgb[b.y : b.y1, b.x : b.x1].copy())

    def close(self) -> None:
        self._rgb = np.zeros((0, 0, 3), np.uint8)
