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
wins an overlap, and is written once. The nuclei arrive band by band (:class:`LabelZarrWriter`) and a chunk
row is painted once no later band can reach it, so memory is bounded by a few chunk rows and the nuclei of
about two bands, whatever the slide's size; lower levels are built chunk by chunk from the level above.
Chunks left empty are not stored (fill value 0). Instance pixels of class 0 read as 0 in ``classes``
(same value as background).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import zarr

from histoseg.atomic import atomic_dir
from histoseg.export.zarr_image import SlideImage, pyramid_shapes, write_root_image
from histoseg.types import InstanceTable, PlaneInfo

__all__ = ["NGFF_VERSION", "ZSTD", "LabelZarrWriter", "pyramid_shapes", "write_label_zarr"]

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


def _class_label_meta(plane: PlaneInfo, classes: range) -> dict[str, Any]:
    """``image-label`` of ``classes``: a colour and a name for every value it can hold (``classes``,
    :meth:`InstanceTable.class_id_range` over the whole slide; 0 transparent)."""
    colors, props = [], []
    for c in classes:
        colors.append({"label-value": c, "rgba": [*plane.class_color(c), 0 if c == 0 else 255]})
        props.append({"label-value": c, "name": plane.class_name(c)})
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


def _chunk_boxes(shape: _Chunk, chunk: int, rows: range | None = None) -> Iterator[tuple[int, int, slice, slice]]:
    """Every chunk of a level (or of its chunk ``rows``): indices and pixel slices, in raster order."""
    h, w = shape
    for cy in rows if rows is not None else range(math.ceil(h / chunk)):
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


class LabelZarrWriter:
    """The OME-NGFF 0.4 container of a slide's nuclei, written table after table (a slide's bands).

    Level 0 is painted chunk row by chunk row as soon as no later table can reach that row: :meth:`write`
    takes ``final_above``, the plane row above which no later table has a mask pixel (a band's next band
    starts its masks at its core's top minus the halo), so only the nuclei that may still meet an unpainted
    row are kept. The lower levels are built from level 0 when the block ends. Use as a context manager:
    the folder appears atomically when the block ends without an error, and not at all otherwise.

    ``image``: the slide whose pyramid becomes the root image (:mod:`histoseg.export.zarr_image`), so
    viewers open the folder itself; ``None`` writes the labels only (the root is then no NGFF image:
    for tests and callers without the slide). ``chunk``: square chunk side in pixels (every level and
    both images); ``levels``: pyramid depth, default halving until the smaller side is below ``chunk``
    (see :func:`pyramid_shapes`). An existing ``path`` is replaced only after the new container is
    complete.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        plane: PlaneInfo,
        *,
        image: SlideImage | None,
        chunk: int = 1024,
        levels: int | None = None,
    ) -> None:
        self.path = path
        self.plane = plane
        self.image = image
        self.chunk = chunk
        self.shapes = pyramid_shapes(plane.plane_shape, chunk, levels)
        self._stack = contextlib.ExitStack()
        self._groups: dict[str, Any] = {}
        self._arrays: dict[str, list[Any]] = {}
        self._pending = InstanceTable.empty(plane)
        self._next_row = 0  # the first chunk row of level 0 not painted yet
        self._filled: set[_Chunk] = set()
        self._top_class = len(plane.class_names)

    def __enter__(self) -> LabelZarrWriter:
        chunk, shapes, plane = self.chunk, self.shapes, self.plane
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(atomic_dir(self.path))
            root = zarr.open_group(store=str(tmp), mode="w", zarr_format=2)
            if self.image is not None:
                write_root_image(root, self.image, InstanceTable.empty(plane), chunk=chunk, compressors=ZSTD)
            root.attrs["histoseg"] = {
                "mpp0": float(plane.mpp0),
                "mpp": float(plane.mpp),
                "scale": float(plane.scale),
                "plane_shape": [int(v) for v in plane.plane_shape],
                "note": "plane pixel (i, j) covers level-0 [j*scale, (j+1)*scale) x [i*scale, (i+1)*scale)",
            }
            labels = root.create_group("labels")
            labels.attrs["labels"] = [name for name, _ in _LABELS]
            for name, dtype in _LABELS:
                group = self._groups[name] = labels.create_group(name)
                group.attrs["multiscales"] = _multiscales(name, len(shapes), float(plane.mpp))
                self._arrays[name] = [
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
            self._stack = stack.pop_all()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        stack, self._stack = self._stack, contextlib.ExitStack()
        if exc_type is not None:  # the temporary folder is removed; nothing appears
            stack.__exit__(exc_type, exc, tb)
            return
        with stack:  # renames the finished folder into place (removes it if this fails)
            self._paint_rows(None)
            self._build_levels()
            classes = range(self._top_class + 1)
            self._groups["classes"].attrs["image-label"] = _class_label_meta(self.plane, classes)
            self._groups["nuclei"].attrs["image-label"] = _nuclei_label_meta()

    def write(self, table: InstanceTable, final_above: int | None = None) -> None:
        """Add ``table``'s nuclei (stitched ids, in ascending order over the writes); paint every chunk row
        that ends at or above ``final_above`` (None: wait for the end)."""
        if not self._arrays:
            raise RuntimeError("LabelZarrWriter.write outside its with-block")
        _validate(table)
        painted = self._next_row * self.chunk
        if len(table) and int(np.asarray(table.mask_offsets, np.int64).reshape(-1, 2)[:, 0].min()) < painted:
            raise ValueError(f"a nucleus reaches above plane row {painted}, which an earlier final_above closed")
        if len(table):
            self._top_class = max(self._top_class, int(np.max(table.class_ids)))
            self._pending = InstanceTable.concat([self._pending, table])
        self._paint_rows(final_above)

    def _paint_rows(self, final_above: int | None) -> None:
        """Paint level 0's chunk rows up to ``final_above`` (None: all), then forget the nuclei that cannot
        reach the rows still to paint."""
        chunk, shape = self.chunk, self.shapes[0]
        rows = math.ceil(shape[0] / chunk)
        stop = rows if final_above is None else min(rows, max(0, final_above) // chunk)
        if stop <= self._next_row:
            return
        table = self._pending
        nuclei, classes = self._arrays["nuclei"], self._arrays["classes"]
        index = _BucketIndex(table, shape, chunk)
        for cy, cx, ys, xs in _chunk_boxes(shape, chunk, range(self._next_row, stop)):
            members = index.candidates(cy, cx)
            if members.size == 0:
                continue
            lab, cls = _paint(table, members, ys, xs)
            if lab.any():
                nuclei[0][ys, xs] = lab
                classes[0][ys, xs] = cls
                self._filled.add((cy, cx))
        self._next_row = stop
        if len(table):  # keep the nuclei whose mask reaches below the painted rows
            bottom = np.asarray(table.mask_offsets, np.int64).reshape(-1, 2)[:, 0]
            bottom = bottom + np.array([m.shape[0] for m in table.masks], np.int64)
            self._pending = table.take(np.flatnonzero(bottom > stop * chunk))

    def _build_levels(self) -> None:
        """Levels 1, 2, ... from the level above, chunk by chunk; chunks whose sources are empty are skipped."""
        nuclei, classes, shapes, chunk = self._arrays["nuclei"], self._arrays["classes"], self.shapes, self.chunk
        filled = self._filled
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


def write_label_zarr(
    table: InstanceTable,
    path: str | os.PathLike[str],
    *,
    image: SlideImage | None,
    chunk: int = 1024,
    levels: int | None = None,
) -> None:
    """Write the OME-NGFF 0.4 container of ``table`` to ``path`` (a ``.zarr`` folder), atomically
    (:class:`LabelZarrWriter`, one table; see there for ``image``, ``chunk`` and ``levels``)."""
    _validate(table)
    with LabelZarrWriter(path, table.plane, image=image, chunk=chunk, levels=levels) as writer:
        writer.write(table)
