"""Content checks run on an opened slide before any work is spent on it."""

from __future__ import annotations

import numpy as np

from histoseg.errors import UnsupportedImageError
from histoseg.io.base import SlideReader

MIN_MEDIAN_BRIGHTNESS = 80.0  # 0..255 luma; brightfield glass is ~240, fluorescence background is ~0-20


def median_brightness(reader: SlideReader, max_size: int = 512) -> float:
    """Median luma (ITU-R BT.601) of a small thumbnail: bright for brightfield, dark for fluorescence."""
    thumb, _ = reader.thumbnail(max_size)
    luma = thumb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return float(np.median(luma))


def check_brightfield(reader: SlideReader) -> None:
    """Refuse slides that are not brightfield (dark background, e.g. fluorescence).

    The network is trained on H&E brightfield images; on a fluorescence image it would return noise, so
    fail early with a clear message instead.
    """
    value = median_brightness(reader)
    if value < MIN_MEDIAN_BRIGHTNESS:
        raise UnsupportedImageError(
            f"{reader.meta.path}: looks like a fluorescence or dark-field image (median brightness "
            f"{value:.0f}/255 < {MIN_MEDIAN_BRIGHTNESS:.0f}); histoseg segments brightfield H&E slides only"
        )
