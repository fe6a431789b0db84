"""OME-Zarr export: the slide image at the root, ``labels/nuclei`` (uint32 ids) and ``labels/classes``.

Format: OME-NGFF 0.4 on Zarr format 2 (``dimension_separator="/"``), the combination QuPath, napari
(napari-ome-zarr), ome-zarr-py and Fiji/MoBIE all read today; chunks are compressed with zstd level 3.
Layout::

    <stem>.zarr/                 .zattrs: multiscales + omero (RGB slide image, see zarr_image.py),
      0/ 1/ ...                           {"histoseg": {mpp0, scale, plane_shape, ...}}
      labels/                    .zattrs: {"labels": ["nuclei", "classes"]}
        nuclei/  0/ 1/ ...       .zattrs: multiscales + image-label (colors: 0 transparent)
        classes/ 0/ 1/ ...       .zattrs: multiscales + image-label (colors, properties for every value)

``classes`` holds class id ``k >= 1`` = the model card's class ``k`` (name and colour from
:meth:`InstanceTable.class_name` / ``class_color``, opaque) and 0 = background (transparent). ``nuclei``
lists only value 0 (transparent): with hundreds of thousands of ids a colour per id does not scale, so
a viewer that treats unlisted values as transparent (napari with napari-ome-zarr 0.10) shows the
``classes`` layer in colour and the ``nuclei`` layer only after the user picks a colormap.

Both rasters cover the processing plane (``table.plane_shape``); level ``k`` is level ``k-1`` sampled
``[::2, ::2]`` (nearest), so with NGFF's pixel-centre convention its transform is a pure
``scale = mpp * 2**k`` (no translation). Plane pixel ``(i, j)`` covers level-0 pixels
``[j*scale, (j+1)*scale) x [i*scale, (i+1)*scale)``.

Rasterisation pulls (design.md section 4 rule 6): each output chunk paints only the instances whose
mask box meets it (found through a bucket index on the chunk grid), in ascending id order so a later id
wins an overlap, and is written once. Memory is bounded by a few chunks plus the table itself; lower
levels are built chunk by chunk from the level above. Chunks left empty are not stored (fill value 0).
Instance pixels of class 0 read as 0 in ``classes`` (same value as background).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import zarr

from histoseg.export.atomic import atomic_dir
from histoseg.export.zarr_image import SlideImage, pyramid_shapes, write_root_image
from histoseg.types import InstanceTable

__all__ = ["NGFF_VERSION", "ZSTD", "pyramid_shapes", "write_label_zarr"]

NGFF_VERSION = "0.4"
ZSTD: dict[str, Any] = {"id": "zstd", "level": 3}
"""numcodecs spec of the chunk compressor (facts.md: best ratio among measured codecs)."""

_LABELS = (("nuclei", np.uint32), ("classes", np.uint8))
_Chunk = tuple[int, int]


def _multiscales(name: str, n_levels: int, mpp: float) -> list[dict[str, Any]]:
    axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in ("y", "x")]
    datasets = [
        {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [mpp * 2**k] * 2}]}
        for k in range(n_levels)
    ]
    return [
        {
            "version": NGFF_VERSION,
            "name": name,
            "axes": axes,
            "datasets": datasets,
            "type": "nearest",
            "metadata": {"method": "numpy slicing [::2, ::2] of the level above"},
        }
    ]


def _class_label_meta(table: InstanceTable) -> dict[str, Any]:
    """``image-label`` of ``classes``: a colour and a name for every value it can hold (0 transparent)."""
    colors, props = [], []
    for c in table.class_id_range():
        colors.append({"label-value": c, "rgba": [*table.class_color(c), 0 if c == 0 else 255]})
        props.append({"label-value": c, "name": table.class_name(c)})
    return {"version": NGFF_VERSION, "colors": colors, "properties": props, "source": {"image": "../../"}}


def _nuclei_label_meta() -> dict[str, Any]:
    """``image-label`` of ``nuclei``: background transparent (ids are too many to list one by one)."""
    return {
        "version": NGFF_VERSION,
        "colors": [{"label-value": 0, "rgba": [0, 0, 0, 0]}],
        "source": {"image": "../../"},
    }


class _BucketIndex:
    """Instances per chunk of a grid (CSR), each bucket sorted in paint order (id, then table row)."""

    def __init__(self, table: InstanceTable, shape: _Chunk, chunk: int) -> None:
        n = len(table)
        h, w = shape
        self.grid = (math.ceil(h / chunk), math.ceil(w / chunk))
        extents = np.array([m.shape for m in table.masks], dtype=np.int64).reshape(n, 2)
        off = np.asarray(table.mask_offsets, dtype=np.int64).reshape(n, 2)
        y0, x0 = np.clip(off[:, 0], 0, h), np.clip(off[:, 1], 0, w)
        y1, x1 = np.clip(off[:, 0] + extents[:, 0], 0, h), np.clip(off[:, 1] + extents[:, 1], 0, w)
        keep = np.flatnonzero((y1 > y0) & (x1 > x0))
        rank = np.empty(n, dtype=np.int64)
        rank[np.argsort(np.asarray(table.ids), kind="stable")] = np.arange(n)
        by0, by1 = y0[keep] // chunk, (y1[keep] - 1) // chunk
        bx0, bx1 = x0[keep] // chunk, (x1[keep] - 1) // chunk
        nx = bx1 - bx0 + 1
        count = (by1 - by0 + 1) * nx
        inst = np.repeat(keep, count)
        k = np.arange(inst.size) - np.repeat(np.cumsum(count) - count, count)
        key = (np.repeat(by0, count) + k // np.repeat(nx, count)) * self.grid[1]
        key += np.repeat(bx0, count) + k % np.repeat(nx, count)
        order = np.lexsort((rank[inst], key))
        self.members = inst[order]
        self.starts = np.searchsorted(key[order], np.arange(self.grid[0] * self.grid[1] + 1))

    def candidates(self, cy: int, cx: int) -> np.ndarray:
        b = cy * self.grid[1] + cx
        return self.members[self.starts[b] : self.starts[b + 1]]  # type: ignore[no-any-return]


def _chunk_boxes(shape: _Chunk, chunk: int) -> Iterator[tuple[int, int, slice, slice]]:
    h, w = shape
    for cy in range(math.ceil(h / chunk)):
        for cx in range(math.ceil(w / chunk)):
            ys = slice(cy * chunk, min(h, (cy + 1) * chunk))
            yield cy, cx, ys, slice(cx * chunk, min(w, (cx + 1) * chunk))


def _paint(table: InstanceTable, rows: np.ndarray, ys: slice, xs: slice) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise instances ``rows`` (already in paint order) into one chunk."""
    lab = np.zeros((ys.stop - ys.start, xs.stop - xs.start), dtype=np.uint32)
    cls = np.zeros(lab.shape, dtype=np.uint8)
    for i in rows:
        mask = table.masks[i]
        oy, ox = (int(v) for v in table.mask_offsets[i])
        sy0, sy1 = max(oy, ys.start), min(oy + mask.shape[0], ys.stop)
        sx0, sx1 = max(ox, xs.start), min(ox + mask.shape[1], xs.stop)
        sub = np.asarray(mask[sy0 - oy : sy1 - oy, sx0 - ox : sx1 - ox], dtype=bool)
        dst = (slice(sy0 - ys.start, sy1 - ys.start), slice(sx0 - xs.start, sx1 - xs.start))
        lab[dst][sub] = table.ids[i]
        cls[dst][sub] = table.class_ids[i]
    return lab, cls


def _validate(table: InstanceTable) -> None:
    n = len(table)
    if len(table.masks) != n or np.asarray(table.mask_offsets).reshape(-1, 2).shape[0] != n:
        raise ValueError(f"InstanceTable has {n} ids but {len(table.masks)} masks / offsets")
    if len(table.class_ids) != n:
        raise ValueError(f"InstanceTable has {n} ids but {len(table.class_ids)} class ids")
    if any(m.ndim != 2 for m in table.masks):
        raise ValueError("every mask must be a 2-D boolean crop")
    ids = np.asarray(table.ids)
    if n and (ids.min() < 1 or ids.max() > np.iinfo(np.uint32).max):
        raise ValueError("label export needs stitched ids in [1, 2**32 - 1] (0 is background)")


def write_label_zarr(
    table: InstanceTable,
    path: str | os.PathLike[str],
    *,
    image: SlideImage | None,
    chunk: int = 1024,
    levels: int | None = None,
) -> None:
    """Write the OME-NGFF 0.4 container of ``table`` to ``path`` (a ``.zarr`` folder), atomically.

    ``image``: the slide whose pyramid becomes the root image (:mod:`histoseg.export.zarr_image`), so
    viewers open the folder itself; ``None`` writes the labels only (the root is then no NGFF image:
    for tests and callers without the slide). ``chunk``: square chunk side in pixels (every level and
    both images); ``levels``: pyramid depth, default halving until the smaller side is below ``chunk``
    (see :func:`pyramid_shapes`). An existing ``path`` is replaced only after the new container is
    complete.
    """
    _validate(table)
    shapes = pyramid_shapes(table.plane_shape, chunk, levels)
    with atomic_dir(path) as tmp:
        root = zarr.open_group(store=str(tmp), mode="w", zarr_format=2)
        if image is not None:
            write_root_image(root, image, table, chunk=chunk, compressors=ZSTD)
        root.attrs["histoseg"] = {
            "mpp0": float(table.mpp0),
            "mpp": float(table.mpp),
            "scale": float(table.scale),
            "plane_shape": [int(v) for v in table.plane_shape],
            "note": "plane pixel (i, j) covers level-0 [j*scale, (j+1)*scale) x [i*scale, (i+1)*scale)",
        }
        labels = root.create_group("labels")
        labels.attrs["labels"] = [name for name, _ in _LABELS]
        arrays: dict[str, list[Any]] = {}
        for name, dtype in _LABELS:
            group = labels.create_group(name)
            group.attrs["multiscales"] = _multiscales(name, len(shapes), float(table.mpp))
            group.attrs["image-label"] = _class_label_meta(table) if name == "classes" else _nuclei_label_meta()
            arrays[name] = [
                group.create_array(
                    str(k),
                    shape=shape,
                    chunks=(max(1, min(chunk, shape[0])), max(1, min(chunk, shape[1]))),
                    dtype=dtype,
                    compressors=ZSTD,
                    fill_value=0,
                    chunk_key_encoding={"name": "v2", "separator": "/"},
                )
                for k, shape in enumerate(shapes)
            ]
        nuclei, classes = arrays["nuclei"], arrays["classes"]

        index = _BucketIndex(table, shapes[0], chunk)
        filled: set[_Chunk] = set()
        for cy, cx, ys, xs in _chunk_boxes(shapes[0], chunk):
            rows = index.candidates(cy, cx)
            if rows.size == 0:
                continue
            lab, cls = _paint(table, rows, ys, xs)
            if lab.any():
                nuclei[0][ys, xs] = lab
                classes[0][ys, xs] = cls
                filled.add((cy, cx))

        for k in range(1, len(shapes)):
            below, filled = filled, set()
            ph, pw = shapes[k - 1]
            for cy, cx, ys, xs in _chunk_boxes(shapes[k], chunk):
                # the 2x2 source chunks of the level above; skip when all of them are empty
                if not any((2 * cy + a, 2 * cx + b) in below for a in (0, 1) for b in (0, 1)):
                    continue
                src_y = slice(2 * ys.start, min(ph, 2 * ys.stop))
                src_x = slice(2 * xs.start, min(pw, 2 * xs.stop))
                lab = np.asarray(nuclei[k - 1][src_y, src_x])[::2, ::2]
                if not lab.any():
                    continue
                nuclei[k][ys, xs] = lab
                classes[k][ys, xs] = np.asarray(classes[k - 1][src_y, src_x])[::2, ::2]
                filled.add((cy, cx))
