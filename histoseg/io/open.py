"""``open_slide``: pick a backend for a path and turn every failure into a histoseg error.

Choice in ``auto`` mode: OME-Zarr folders -> OME-Zarr reader; PNG/JPEG/BMP and single-page untiled TIFFs
-> plain-image reader; everything else -> TiffSlide, then OpenSlide if TiffSlide cannot open or decode it.
A file whose name or signature claims a slide/image format but that no backend can decode is corrupt
(:class:`CorruptSlideError`); anything else is :class:`UnsupportedFormatError`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

from histoseg.config import BACKENDS
from histoseg.errors import (
    ConfigError,
    CorruptSlideError,
    SlideError,
    SlideNotFoundError,
    UnsupportedFormatError,
)
from histoseg.io.base import SlideReader
from histoseg.types import Box

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".mrxs", ".vms", ".vmu", ".svslide", ".qptiff", ".dcm",
)  # fmt: skip
MAX_PLAIN_TIFF_PIXELS = 1 << 28  # larger single-page TIFFs are read lazily by tiffslide, not loaded whole
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"BM")
_SUPPORTED = (
    "slides (SVS, NDPI, TIFF, MRXS, SCN, ...), plain images (PNG, JPEG, BMP, TIFF) and OME-Zarr folders"
)


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(8)
    except OSError as e:
        raise SlideError(f"cannot read {path}: {e}") from e


def _is_plain_tiff(path: Path) -> bool:
    """A single-page, untiled TIFF without a slide vendor flavour: a plain image, not a pyramid."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            flavours = ("is_svs", "is_ndpi", "is_scn", "is_ome", "is_philips", "is_bif", "is_qpi")
            if any(getattr(tf, f, False) for f in flavours):
                return False
            page = tf.pages.first
            return len(tf.pages) == 1 and not page.is_tiled and page.size <= MAX_PLAIN_TIFF_PIXELS * 4
    except Exception:
        return False


def _probe(reader: SlideReader) -> None:
    """Decode one pixel of the smallest level so broken codecs/tiles fail at open, not mid-run."""
    lv = reader.meta.level_count - 1
    w, h = reader.meta.level_dimensions[lv]
    reader.read_level(lv, Box(w // 2, h // 2, 1, 1))


def _backend_factory(name: str) -> Callable[[Path, float | None], SlideReader]:
    if name == "tiffslide":
        from histoseg.io.tiffslide_backend import TiffSlideReader

        return TiffSlideReader
    if name == "openslide":
        from histoseg.io.openslide_backend import OpenSlideReader

        return OpenSlideReader
    if name == "image":
        from histoseg.io.image_backend import ImageReader

        return ImageReader
    from histoseg.io.omezarr_backend import OmeZarrReader

    return OmeZarrReader


def _claims(name: str, path: Path, magic: bytes) -> bool:
    """Whether the file's name or signature says backend ``name`` should read it (then failing = corrupt)."""
    suffix = path.suffix.lower()
    is_tiff = magic.startswith(_TIFF_MAGIC)
    if name == "image":
        return magic.startswith(_IMAGE_MAGIC) or suffix in IMAGE_SUFFIXES + (".tif", ".tiff") or is_tiff
    return suffix in SLIDE_SUFFIXES or is_tiff


def _try(name: str, path: Path, mpp: float | None) -> SlideReader:
    """Open with one backend and probe it; SlideErrors pass through, anything else is CorruptSlideError."""
    try:
        reader = _backend_factory(name)(path, mpp)
    except SlideError:
        raise
    except Exception as e:
        raise CorruptSlideError(f"{path}: {name} cannot open it ({type(e).__name__}: {e})") from e
    try:
        _probe(reader)
    except Exception:
        reader.close()
        raise
    return reader


def _auto_order(path: Path, magic: bytes) -> list[str]:
    suffix = path.suffix.lower()
    if magic.startswith(_IMAGE_MAGIC) or (suffix in IMAGE_SUFFIXES and not magic.startswith(_TIFF_MAGIC)):
        return ["image"]
    if magic.startswith(_TIFF_MAGIC) and _is_plain_tiff(path):
        return ["image"]
    return ["tiffslide", "openslide"]


def open_slide(path: str | os.PathLike[str], backend: str = "auto", mpp: float | None = None) -> SlideReader:
    """Open a slide, a plain image or an OME-Zarr folder for reading.

    ``backend``: one of :data:`histoseg.config.BACKENDS` (any other string raises ConfigError). ``mpp`` (µm per
    level-0 pixel) overrides the metadata (``meta.mpp_source == "user"``); without either, ``meta.mpp`` is
    None and physical-unit reads raise MissingMppError naming ``--slide-mpp``.
    """
    p = Path(path)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise ConfigError(f"--slide-mpp must be a positive number of µm per pixel, got {mpp}")
    if not p.exists():
        raise SlideNotFoundError(f"slide not found: {p}")
    if p.is_dir():
        from histoseg.io.omezarr_backend import is_zarr_dir

        if backend in ("auto", "omezarr") and is_zarr_dir(p):
            return _try("omezarr", p, mpp)
        raise UnsupportedFormatError(
            f"{p} is a directory, not a supported slide; histoseg reads {_SUPPORTED}"
        )
    if backend == "omezarr":
        raise UnsupportedFormatError(f"{p}: the omezarr backend reads OME-Zarr folders, not files")
    magic = _magic(p)
    order = _auto_order(p, magic) if backend == "auto" else [backend]
    errors: list[SlideError] = []
    for name in order:
        try:
            return _try(name, p, mpp)
        except (CorruptSlideError, UnsupportedFormatError) as e:
            errors.append(e)
    detail = "; ".join(str(e) for e in errors)
    if any(_claims(name, p, magic) for name in order):
        raise CorruptSlideError(f"{p}: damaged or truncated file, no backend could decode it ({detail})")
    raise UnsupportedFormatError(f"{p}: not a supported format; histoseg reads {_SUPPORTED} ({detail})")
