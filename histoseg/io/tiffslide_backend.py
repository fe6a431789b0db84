"""TiffSlide backend: the default for TIFF-based slides (Aperio SVS, Hamamatsu NDPI, pyramidal TIFF...).

Pure Python on top of tifffile/imagecodecs; one open slide serves concurrent threads (tiffslide keeps a
per-thread zarr view of the file). Reads address level pixels exactly, whatever the level's downsample.
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from histoseg.errors import CorruptSlideError, ImplausibleSlideError, UnsupportedImageError
from histoseg.io.base import MAX_TAG_MPP, SlideReader, as_float, resolve_mpp, select_properties
from histoseg.io.limits import check_tiff_pages
from histoseg.io.resample import U8, to_rgb
from histoseg.types import Box, SlideMeta


def _level0_location(lx: int, ds: float) -> int:
    """A level-0 coordinate that tiffslide maps back to level coordinate ``lx`` (as int(loc / ds))."""
    loc = math.ceil(lx * ds)
    while int(loc / ds) > lx:
        loc -= 1
    while int(loc / ds) < lx:
        loc += 1
    return loc


def _data_end(series: Any) -> int:
    """End offset of the last pixel byte any level of ``series`` refers to (beyond the file: truncated)."""
    end = 0
    for lv in series.levels:
        for page in lv.pages:
            if page is None or not len(page.dataoffsets):
                continue
            offs = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)
            end = max(end, int(offs.max()))
    return end


def _dangling_ifd(tf: Any) -> bool:
    """True when the last image directory links to a next one that is missing (a cut-off pyramid)."""
    t = tf.tiff
    last = tf.pages[len(tf.pages) - 1]
    fh = tf.filehandle
    fmt = t.byteorder + "Q" if t.is_ndpi else t.offsetformat  # NDPI: 64-bit next-IFD offsets
    with fh.lock:
        fh.seek(last.offset)
        n = struct.unpack(t.tagnoformat, fh.read(t.tagnosize))[0]
        fh.seek(last.offset + t.tagnosize + n * t.tagsize)
        raw = fh.read(struct.calcsize(fmt))
    return len(raw) < struct.calcsize(fmt) or struct.unpack(fmt, raw)[0] != 0


class TiffSlideReader(SlideReader):
    """Reader backed by ``tiffslide.TiffSlide``."""

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        import tiffslide

        self._path = str(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "metadata parsing only partially implemented" and friends
            self._slide = tiffslide.TiffSlide(self._path)
            try:
                props = dict(self._slide.properties)
                dims = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
                downs = tuple(float(d) for d in self._slide.level_downsamples)
                series = self._slide.ts_tifffile.series[int(props.get("tiffslide.series-index") or 0)]
                dtype = np.dtype(series.dtype)
                end = _data_end(series)
                dangling = _dangling_ifd(self._slide.ts_tifffile)
                level_pages = [list(lv.pages) for lv in series.levels]
            except Exception as e:
                self._slide.close()
                raise CorruptSlideError(f"{self._path}: cannot read the slide structure ({e})") from e
        if not dims or min(min(d) for d in dims) < 1:
            self._slide.close()
            raise CorruptSlideError(f"{self._path}: the file holds no image")
        size = os.path.getsize(self._path)
        if dangling:
            self._slide.close()
            raise CorruptSlideError(
                f"{self._path}: truncated file (the last image directory points past the end)"
            )
        if end > size:
            self._slide.close()
            raise CorruptSlideError(
                f"{self._path}: truncated file (pixel data ends at byte {end}, file has {size})"
            )
        try:  # before any pixel is decoded: refuse geometry the file's bytes cannot hold
            check_tiff_pages(self._path, [(w, h, pages) for (w, h), pages in zip(dims, level_pages, strict=False)])
        except ImplausibleSlideError:
            self._slide.close()
            raise
        if dtype != np.uint8:
            self._slide.close()
            raise UnsupportedImageError(f"{self._path}: {dtype} pixels; histoseg reads 8-bit RGB slides only")
        vendor = str(props.get("tiffslide.vendor") or "generic-tiff")
        meta_mpp = as_float(props.get("tiffslide.mpp-x"))
        if vendor == "generic-tiff" and meta_mpp is not None and meta_mpp > MAX_TAG_MPP:
            meta_mpp = None  # e.g. the 72 dpi default of image editors
        use_mpp, source = resolve_mpp(meta_mpp, mpp)
        self.meta = SlideMeta(
            path=self._path,
            backend="tiffslide",
            vendor=vendor,
            level_dimensions=dims,
            level_downsamples=downs,
            mpp=use_mpp,
            objective_power=as_float(props.get("tiffslide.objective-power")),
            bounds_offset=(
                int(as_float(props.get("tiffslide.bounds-x")) or 0),
                int(as_float(props.get("tiffslide.bounds-y")) or 0),
            ),
            mpp_source=source,
            properties=select_properties(props),
        )

    def _fetch(self, level: int, box: Box) -> U8:
        ds = self.meta.level_downsamples[level]
        loc = (_level0_location(box.x, ds), _level0_location(box.y, ds))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = self._slide.read_region(loc, level, (box.w, box.h), as_array=True, padding=False)
        except Exception as e:
            raise CorruptSlideError(f"{self._path}: cannot decode level {level} {box} ({e})") from e
        arr = np.asarray(arr)
        if arr.shape[:2] != (box.h, box.w):
            raise CorruptSlideError(f"{self._path}: level {level} {box} decoded to shape {arr.shape}")
        return to_rgb(arr)

    def read_level(self, level: int, box: Box) -> U8:
        return self._padded(level, box, lambda b: self._fetch(level, b))

    def close(self) -> None:
        self._slide.close()
