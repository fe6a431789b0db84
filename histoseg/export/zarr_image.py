"""The slide as the OME-NGFF 0.4 *image* at the root of ``<stem>.zarr`` (the labels live under it).

Why: napari (napari-ome-zarr), ome-zarr-py and SpatialData open a ``.zarr`` folder only when its root is
an image; the labels alone open only from their subfolder and show nothing to align them with.

Resolution (documented choice): the image's level 0 is ``factor`` (default 2) times coarser than the
labels' level 0, i.e. 1 µm/px for the default 0.5 µm/px model: the tissue context a reviewer needs at a
quarter of the pixels (so the export stays cheap next to segmentation), while the labels keep the full
processing resolution. Each further level halves the one above (2 x 2 mean, rounding sizes up) until
the smaller side is below one chunk, as the labels do.

Geometry: image pixel ``(i, j)`` of level ``m`` covers level-0 slide pixels
``[j*S, (j+1)*S) x [i*S, (i+1)*S)`` with ``S = factor * 2**m * scale`` (``scale``: level-0 pixels per
label pixel). The labels' transform is a pure scale, so a label pixel sits at NGFF coordinate
``index * scale * mpp0`` µm, half a label pixel before its level-0 centre. The image gets
``scale = S * mpp0`` plus ``translation = (S - scale) * mpp0 / 2`` per level, which puts every image
pixel at its level-0 centre minus the same half label pixel: image and labels align exactly. Viewers that
ignore translations (napari-ome-zarr 0.10) are off by less than one image pixel.

Layout: array ``0, 1, ...`` of uint8 ``(c, y, x)`` with ``c`` = R, G, B (axis type ``channel``), chunks
``(3, chunk, chunk)``, zstd; ``omero`` metadata gives red/green/blue channels with the 0-255 window so
napari shows the additive RGB image. Pixels are read chunk by chunk through :mod:`histoseg.io`
(``read_plane`` at the image's µm/px, translation-exact and padded white past the slide), so memory is
bounded by a few chunks whatever the slide size.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from histoseg.io import open_slide
from histoseg.types import Box, InstanceTable

__all__ = ["CHANNELS", "SlideImage", "pyramid_shapes", "write_root_image"]

CHANNELS = (("R", "FF0000"), ("G", "00FF00"), ("B", "0000FF"))


@dataclass(frozen=True)
class SlideImage:
    """Where the root image's pixels come from: the slide, opened as the pipeline opened it.

    ``backend`` and ``slide_mpp`` are passed to :func:`histoseg.io.open_slide` unchanged (so the pixel
    size is the one the labels were computed with); ``factor``: image level 0 is this many label pixels
    per side (an integer >= 1).
    """

    path: str | os.PathLike[str]
    backend: str = "auto"
    slide_mpp: float | None = None
    factor: int = 2


def pyramid_shapes(plane_shape: tuple[int, int], chunk: int, levels: int | None = None) -> list[tuple[int, int]]:
    """Shapes of the pyramid levels (image and labels): halve (rounding up) until the smaller side is
    < ``chunk``.

    ``levels`` forces the number of levels (at least 1).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if levels is not None and levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    h, w = (int(v) for v in plane_shape)
    shapes = [(h, w)]
    while (len(shapes) < levels) if levels is not None else (min(shapes[-1]) >= chunk):
        ph, pw = shapes[-1]
        shapes.append((math.ceil(ph / 2), math.ceil(pw / 2)))
    return shapes


def _block_mean(a: np.ndarray) -> np.ndarray:
    """2 x 2 mean of a (c, h, w) uint8 block; an odd last row/column is averaged with itself."""
    c, h, w = a.shape
    if h % 2 or w % 2:
        a = np.pad(a, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
    s = a.reshape(c, a.shape[1] // 2, 2, a.shape[2] // 2, 2).astype(np.uint16).sum(axis=(2, 4))
    half: np.ndarray = ((s + 2) // 4).astype(np.uint8)
    return half


def _multiscales(n_levels: int, level0_px: float, table: InstanceTable) -> list[dict[str, Any]]:
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in ("y", "x")
    ]
    datasets = []
    for m in range(n_levels):
        s_px = level0_px * 2**m  # level-0 slide pixels per image pixel
        um = s_px * table.mpp0
        shift = (s_px - table.scale) * table.mpp0 / 2
        datasets.append(
            {
                "path": str(m),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0, um, um]},
                    {"type": "translation", "translation": [0.0, shift, shift]},
                ],
            }
        )
    return [
        {
            "version": "0.4",
            "name": "slide",
            "axes": axes,
            "datasets": datasets,
            "type": "mean",
            "metadata": {"method": "histoseg.io read_plane (level 0), then 2x2 mean of the level above"},
        }
    ]


def _omero() -> dict[str, Any]:
    channels = [
        {
            "label": name,
            "color": color,
            "window": {"min": 0, "max": 255, "start": 0, "end": 255},
            "active": True,
            "coefficient": 1.0,
            "family": "linear",
            "inverted": False,
        }
        for name, color in CHANNELS
    ]
    return {"name": "slide", "version": "0.4", "channels": channels, "rdefs": {"model": "color"}}


def write_root_image(
    root: zarr.Group,
    image: SlideImage,
    table: InstanceTable,
    *,
    chunk: int,
    compressors: dict[str, Any],
    levels: int | None = None,
) -> list[tuple[int, int]]:
    """Write the slide pyramid into ``root`` (arrays ``0, 1, ...`` plus ``multiscales``/``omero``).

    Returns the (H, W) of every level. ``levels`` forces the pyramid depth (default: halve until the
    smaller side is below ``chunk``).
    """
    if not (isinstance(image.factor, int) and image.factor >= 1):
        raise ValueError(f"image factor must be an integer >= 1, got {image.factor!r}")
    mpp = table.mpp0 * table.scale * image.factor  # µm per image pixel, on the labels' grid
    with open_slide(image.path, backend=image.backend, mpp=image.slide_mpp) as reader:
        level0_px = reader.plane_scale(mpp)
        shapes = pyramid_shapes(reader.plane_shape(mpp), chunk, levels)
        arrays = [
            root.create_array(
                str(m),
                shape=(3, *shape),
                chunks=(3, max(1, min(chunk, shape[0])), max(1, min(chunk, shape[1]))),
                dtype=np.uint8,
                compressors=compressors,
                fill_value=255,
                chunk_key_encoding={"name": "v2", "separator": "/"},
            )
            for m, shape in enumerate(shapes)
        ]
        h, w = shapes[0]
        for y in range(0, h, chunk):
            for x in range(0, w, chunk):
                box = Box(x, y, min(chunk, w - x), min(chunk, h - y))
                rgb = reader.read_plane(box, mpp)
                arrays[0][:, y : box.y1, x : box.x1] = np.ascontiguousarray(rgb.transpose(2, 0, 1))
    for m in range(1, len(shapes)):
        ph, pw = shapes[m - 1]
        h, w = shapes[m]
        for y in range(0, h, chunk):
            for x in range(0, w, chunk):
                ys = slice(2 * y, min(ph, 2 * (y + chunk)))
                src = np.asarray(arrays[m - 1][:, ys, 2 * x : min(pw, 2 * (x + chunk))])
                arrays[m][:, y : min(h, y + chunk), x : min(w, x + chunk)] = _block_mean(src)
    root.attrs["multiscales"] = _multiscales(len(shapes), level0_px, table)
    root.attrs["omero"] = _omero()
    return shapes
