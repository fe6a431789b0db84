"""OpenSlide backend: the fallback for formats TiffSlide cannot read (MIRAX, Ventana, Philips, DICOM...).

OpenSlide addresses levels through level-0 coordinates divided by a float downsample. Where that
downsample is not an integer (e.g. 2.0005 or 4.0003 in real SVS files) a level pixel generally does not
start at an integer level-0 coordinate and OpenSlide resamples sub-pixel offsets itself. Those levels are
still readable with ``read_level`` but are left out of ``plane_levels`` so ``read_plane`` stays exact.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from histoseg.errors import CorruptSlideError, ImplausibleSlideError, UnsupportedFormatError
from histoseg.io.base import SlideReader, as_float, resolve_mpp, select_properties
from histoseg.io.limits import check_expansion
from histoseg.io.resample import U8, to_rgb
from histoseg.types import Box, SlideMeta


def _is_tiff_file(path: str) -> bool:
    """A single TIFF file (SVS, NDPI, SCN, ...), not a multi-file format (MRXS, VMS) or a folder."""
    try:
        with open(path, "rb") as f:
            return f.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    except OSError:
        return False


class OpenSlideReader(SlideReader):
    """Reader backed by ``openslide.OpenSlide`` (thread-safe in the C library)."""

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        try:
            import openslide
        except (ImportError, OSError) as e:  # OSError: the shared library is missing
            raise UnsupportedFormatError(
                f"the OpenSlide backend is unavailable ({e}); install openslide-python and openslide-bin"
            ) from e
        self._path = str(path)
        self._slide = openslide.OpenSlide(self._path)
        props: dict[str, object] = dict(self._slide.properties)
        dims = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        if _is_tiff_file(self._path):
            try:  # a single-file TIFF slide holds all its pixels in this file
                check_expansion(self._path, "level 0", dims[0][0], dims[0][1], os.path.getsize(self._path))
            except ImplausibleSlideError:
                self._slide.close()
                raise
        self._ds = tuple(float(d) for d in self._slide.level_downsamples)
        use_mpp, source = resolve_mpp(as_float(props.get("openslide.mpp-x")), mpp)
        self.meta = SlideMeta(
            path=self._path,
            backend="openslide",
            vendor=str(props.get("openslide.vendor") or "unknown"),
            level_dimensions=dims,
            level_downsamples=self._ds,
            mpp=use_mpp,
            objective_power=as_float(props.get("openslide.objective-power")),
            bounds_offset=(
                int(as_float(props.get("openslide.bounds-x")) or 0),
                int(as_float(props.get("openslide.bounds-y")) or 0),
            ),
            mpp_source=source,
            properties=select_properties(props),
        )

    def plane_levels(self) -> tuple[int, ...]:
        """Levels OpenSlide returns without sub-pixel resampling: those with an integer downsample."""
        return tuple(lv for lv, ds in enumerate(self._ds) if ds.is_integer()) or (0,)

    def _fetch(self, level: int, box: Box) -> U8:
        ds = self._ds[level]
        try:
            img = self._slide.read_region((round(box.x * ds), round(box.y * ds)), level, (box.w, box.h))
        except Exception as e:
            raise CorruptSlideError(f"{self._path}: cannot decode level {level} {box} ({e})") from e
        return to_rgb(np.asarray(img))

    def read_level(self, level: int, box: Box) -> U8:
        return self._padded(level, box, lambda b: self._fetch(level, b))

    def close(self) -> None:
        self._slide.close()
