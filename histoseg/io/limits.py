"""Plausibility of a slide's declared geometry against the bytes it really holds (decompression bombs).

A TIFF header can declare 10^6 x 10^6 pixels in a few KB (every strip or tile pointing at the same small
compressed block, or at no data at all); reading such a file would take hours and gigabytes for nothing.
Every backend checks, at open and before any pixel is decoded, that each level's decoded size is at most
``MAX_EXPANSION`` times the distinct bytes its pixel data occupies in the file. Real slides are far below
the bound: JPEG / JPEG 2000 slides expand 10-30x, lossless deflate of a blank image at most ~1030x (the
format's own limit); a declared size beyond it cannot be real pixel data.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from histoseg.errors import ImplausibleSlideError

MAX_EXPANSION = 4096  # decoded RGB bytes per stored byte; deflate cannot exceed ~1032, LZW ~1400


def check_expansion(path: str | os.PathLike[str], what: str, width: int, height: int, stored: int) -> None:
    """Raise ImplausibleSlideError when ``width x height`` RGB pixels cannot come from ``stored`` bytes."""
    decoded = 3 * int(width) * int(height)
    if decoded > MAX_EXPANSION * max(int(stored), 0):
        raise ImplausibleSlideError(
            f"{path}: {what} declares {width} x {height} px ({decoded / 1e9:.3g} GB of pixels) but holds "
            f"{stored} bytes of pixel data; refusing a file that cannot be a real image (damaged or a "
            "decompression bomb)"
        )


def covered_bytes(offsets: Iterable[int], counts: Iterable[int], file_size: int) -> int:
    """Distinct bytes of ``[0, file_size)`` covered by the ranges ``[offset, offset + count)``.

    Overlapping or repeated ranges (strips that all point at one block) count once.
    """
    off = np.fromiter((int(o) for o in offsets), np.int64)
    cnt = np.fromiter((int(c) for c in counts), np.int64)
    if off.size == 0 or cnt.size != off.size:
        return 0
    start = np.clip(off, 0, file_size)
    end = np.clip(off + np.maximum(cnt, 0), 0, file_size)
    order = np.argsort(start, kind="stable")
    start, end = start[order], end[order]
    reach = np.maximum.accumulate(end)  # furthest end seen so far
    prev = np.concatenate([[0], reach[:-1]])
    fresh = np.clip(end - np.maximum(start, prev), 0, None)
    return int(fresh.sum())


def check_tiff_pages(path: str | os.PathLike[str], levels: Iterable[tuple[int, int, list[Any]]]) -> None:
    """Check every level given as ``(width, height, tifffile pages)`` against its pages' distinct data bytes."""
    size = os.path.getsize(path)
    for i, (w, h, pages) in enumerate(levels):
        offs: list[int] = []
        counts: list[int] = []
        for page in pages:
            if page is not None:
                offs.extend(int(o) for o in page.dataoffsets)
                counts.extend(int(c) for c in page.databytecounts)
        check_expansion(path, f"level {i}", w, h, covered_bytes(offs, counts, size))


def folder_bytes(folder: str | os.PathLike[str]) -> int:
    """Total size of the files below ``folder`` (a Zarr store's stored chunks)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(Path(root) / name)
            except OSError:
                continue
    return total
