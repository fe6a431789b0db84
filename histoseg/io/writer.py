"""Write Aperio-SVS-compatible tiled pyramidal TIFFs that both TiffSlide and OpenSlide open with their mpp.

Layout (what both readers expect of an SVS): page 0 = level 0 (tiled, ImageDescription
``Aperio Image Library ...|AppMag = ..|MPP = ..``), page 1 = a small stripped thumbnail, pages 2.. = the
reduced levels (tiled, each half the previous one, ceil-rounded, 2 x 2 means with white beyond the edge),
down to the first level whose longer side is <= ``min_level_size``.

Level 0 is pulled from the source in strips of whole tile rows, so a source callable lets a slide far
larger than memory be written; each reduced level is spilled to a temporary memory-mapped file beside the
output when it is large. The file appears atomically (temporary file in the same folder, then os.replace).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from histoseg.errors import ConfigError, OutputError
from histoseg.io.resample import U8, block_mean, white
from histoseg.types import Box

Source = Callable[[Box], np.ndarray]
COMPRESSIONS = ("jpeg", "zlib", "none")
THUMBNAIL_MAX = 1024  # longest side of the page-1 thumbnail (at most; halved until it fits)
IN_MEMORY_LEVEL_BYTES = 64 << 20  # reduced levels larger than this go to a temporary memmap


def _array_source(arr: np.ndarray, w: int, h: int) -> Source:
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape != (h, w, 3):
        raise ValueError(f"source array must be ({h}, {w}, 3) uint8, got {arr.shape} {arr.dtype}")

    def fetch(b: Box) -> np.ndarray:
        return arr[b.y : b.y1, b.x : b.x1]

    return fetch


def _pad(a: np.ndarray, h: int, w: int) -> U8:
    """``a`` in the top-left corner of a white (h, w, 3) canvas (``a`` itself when it fits exactly)."""
    if a.shape[0] == h and a.shape[1] == w:
        return np.ascontiguousarray(a, dtype=np.uint8)
    out = white(h, w)
    out[: a.shape[0], : a.shape[1]] = a
    return out


class _Reduced:
    """Destination of an f x f mean-reduced copy of a level, in memory or in a temporary memmap."""

    def __init__(self, h: int, w: int, f: int, tmpdir: str | None) -> None:
        self.f = f
        if tmpdir is not None and h * w * 3 > IN_MEMORY_LEVEL_BYTES:
            fd, name = tempfile.mkstemp(dir=tmpdir, suffix=".raw")
            os.close(fd)
            self.arr: np.ndarray = np.memmap(name, dtype=np.uint8, mode="w+", shape=(h, w, 3))
        else:
            self.arr = np.empty((h, w, 3), np.uint8)

    def put(self, y: int, strip: np.ndarray) -> None:
        """Reduce a level strip starting at level row ``y`` (a multiple of ``f``) and store it."""
        f = self.f
        h, w = self.arr.shape[:2]
        rows = min(-(-strip.shape[0] // f), h - y // f)
        block = _pad(strip, rows * f, w * f)
        self.arr[y // f : y // f + rows] = block_mean(block, f, f)


def _level_sizes(w: int, h: int, min_level_size: int) -> list[tuple[int, int]]:
    sizes = [(w, h)]
    while max(sizes[-1]) > min_level_size:
        pw, ph = sizes[-1]
        sizes.append((-(-pw // 2), -(-ph // 2)))
    return sizes


def _header(w0: int, h0: int, tile: int, codec: str, tail: str) -> str:
    return f"Aperio Image Library histoseg\r\n{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile}) {tail}{codec}"


def write_pyramidal_tiff(
    path: str | os.PathLike[str],
    source: np.ndarray | Source,
    size: tuple[int, int],
    mpp: float,
    *,
    tile: int = 256,
    compression: str = "jpeg",
    quality: int = 90,
    min_level_size: int = 512,
    magnification: float | None = None,
) -> None:
    """Write ``source`` (an (H, W, 3) uint8 array, or a callable ``Box -> level-0 pixels of that box``) of
    ``size`` (W, H) at ``mpp`` µm/px as a tiled SVS-style pyramid.

    ``compression``: ``jpeg`` (YCbCr 4:2:0 at ``quality``), ``zlib`` (lossless) or ``none``. ``AppMag`` is
    written only when ``magnification`` is given.
    """
    w, h = (int(v) for v in size)
    if w < 1 or h < 1:
        raise ValueError(f"size must be positive, got {size}")
    if tile < 16 or tile % 16:
        raise ConfigError(f"tile must be a positive multiple of 16, got {tile}")
    if compression not in COMPRESSIONS:
        raise ConfigError(f"unknown compression {compression!r}; choose from {', '.join(COMPRESSIONS)}")
    if not (1 <= quality <= 100):
        raise ConfigError(f"JPEG quality must be in 1..100, got {quality}")
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ConfigError(f"mpp must be a positive number, got {mpp}")
    fetch = _array_source(source, w, h) if isinstance(source, np.ndarray) else source

    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as e:
        raise OutputError(f"cannot write {target}: {e}") from e
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".histoseg-pyramid-") as tmpdir:
            _write(
                tmp_name, fetch, w, h, mpp, tile, compression, quality, min_level_size, magnification, tmpdir
            )
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _write(
    out: str,
    fetch: Source,
    w: int,
    h: int,
    mpp: float,
    tile: int,
    compression: str,
    quality: int,
    min_level_size: int,
    magnification: float | None,
    tmpdir: str,
) -> None:
    import tifffile

    sizes = _level_sizes(w, h, min_level_size)
    tf = 1
    while max(w, h) > THUMBNAIL_MAX * tf:
        tf *= 2
    tw_, th_ = -(-w // tf), -(-h // tf)
    rows0 = math.lcm(tile, tf)

    codec = f"JPEG/RGB Q={quality}" if compression == "jpeg" else f"{compression.upper()}/RGB"
    meta = f"|MPP = {float(mpp)!r}"
    if magnification is not None:
        meta = f"|AppMag = {float(magnification):g}" + meta
    tiled: dict[str, Any] = {
        "tile": (tile, tile),
        "photometric": "rgb",  # with JPEG, tifffile stores YCbCr 4:2:0 (the Aperio layout)
        "compression": None if compression == "none" else compression,
        "compressionargs": {"level": quality} if compression == "jpeg" else None,
        "metadata": None,
        "software": "histoseg",
        "subfiletype": 0,
        "resolutionunit": "CENTIMETER",
    }
    raw_total = sum(3 * a * b for a, b in sizes)
    with tifffile.TiffWriter(out, bigtiff=raw_total > (2 << 30)) as tw:
        level_fetch = fetch
        thumb = _Reduced(th_, tw_, tf, None)
        for lv, (lw, lh) in enumerate(sizes):
            nxt = _Reduced(sizes[lv + 1][1], sizes[lv + 1][0], 2, tmpdir) if lv + 1 < len(sizes) else None
            tiles = _tiles(
                level_fetch, lw, lh, tile, rows0 if lv == 0 else tile, nxt, thumb if lv == 0 else None
            )
            desc = _header(w, h, tile, codec, "" if lv == 0 else f"-> {lw}x{lh} ") + (meta if lv == 0 else "")
            res = 1e4 / (mpp * w / lw)
            tw.write(
                tiles, shape=(lh, lw, 3), dtype=np.uint8, description=desc, resolution=(res, res), **tiled
            )
            if lv == 0:
                tdesc = f"Aperio Image Library histoseg\r\n{w}x{h} -> {tw_}x{th_} - {meta}"
                tw.write(
                    thumb.arr,
                    photometric="rgb",
                    compression=None if compression == "none" else "zlib",
                    description=tdesc,
                    metadata=None,
                    software="histoseg",
                    subfiletype=0,
                )
            if nxt is not None:
                level_fetch = _array_source(nxt.arr, *sizes[lv + 1])


def _tiles(
    fetch: Source, w: int, h: int, tile: int, rows: int, nxt: _Reduced | None, thumb: _Reduced | None
) -> Iterator[U8]:
    """Tiles of one level in TIFF order, pulling ``rows`` source rows at a time and feeding the reductions."""
    cols = -(-w // tile) * tile
    for y in range(0, h, rows):
        sh = min(rows, h - y)
        strip = np.asarray(fetch(Box(0, y, w, sh)))
        if strip.shape != (sh, w, 3) or strip.dtype != np.uint8:
            raise ValueError(f"source returned {strip.shape} {strip.dtype} for {Box(0, y, w, sh)}")
        if nxt is not None:
            nxt.put(y, strip)
        if thumb is not None:
            thumb.put(y, strip)
        block = _pad(strip, -(-sh // tile) * tile, cols)
        for ty in range(0, block.shape[0], tile):
            for tx in range(0, cols, tile):
                yield np.ascontiguousarray(block[ty : ty + tile, tx : tx + tile])
