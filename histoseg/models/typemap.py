"""The type head's per-class probabilities on its own grid, as inference hands them on (numpy only, no torch).

The TP head computes its logits at a stride (``NetConfig.type_stride``: 2 or 4 input pixels a cell) and the
network's training output upsamples them to every pixel by nearest neighbour. Inference keeps the cells: a
nucleus's mean over the upsampled map is exactly the mean of the cells under its pixels, each counted once per
pixel, so nothing is lost. What it saves (issue 13): a region's four full-resolution type maps are ~32 MB, and
the engine's output, its float32 copy and the sigmoid each held one per worker; on the stride-4 grid they are
1/16 of that.

Cell ``(i, j)`` covers the input pixels ``[i*s, (i+1)*s) x [j*s, (j+1)*s)`` of an image whose pixel ``(0, 0)`` is
the network input's pixel ``(0, 0)``. A map cropped to an image of ``h x w`` pixels keeps ``ceil(h/s) x ceil(w/s)``
cells. Mirroring and transposing the cells is mirroring and transposing the pixels only when the image's sides are
multiples of ``s``: the views (:mod:`histoseg.inference.views`) do it on the stride-padded input, whose sides are
multiples of the network stride.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histoseg.errors import ModelError


@dataclass(frozen=True)
class TypeMap:
    """Per-class probabilities ``prob`` (C, h, w), float32, one cell per ``stride`` x ``stride`` input pixels."""

    prob: np.ndarray
    stride: int

    def __post_init__(self) -> None:
        if self.prob.ndim != 3 or self.stride < 1:
            raise ModelError(f"a type map is (C, h, w) with a stride >= 1, got {self.prob.shape}, stride {self.stride}")

    @property
    def n_types(self) -> int:
        return int(self.prob.shape[0])

    def cells(self, h: int, w: int) -> tuple[int, int]:
        """The number of cells that cover an image of ``h`` x ``w`` pixels."""
        s = self.stride
        return -(-h // s), -(-w // s)

    def covers(self, h: int, w: int) -> bool:
        """Whether the map has a cell for every pixel of an ``h`` x ``w`` image."""
        ch, cw = self.cells(h, w)
        return bool(self.prob.shape[1] >= ch and self.prob.shape[2] >= cw)

    def crop(self, h: int, w: int) -> TypeMap:
        """The cells that cover the top-left ``h`` x ``w`` pixels (``ModelError`` if the map is smaller)."""
        if not self.covers(h, w):
            raise ModelError(
                f"a type map of {self.prob.shape[1:]} cells at stride {self.stride} does not cover {h}x{w} pixels "
                "(an engine exported by another version: clear the ONNX cache)"
            )
        ch, cw = self.cells(h, w)
        return TypeMap(self.prob[:, :ch, :cw], self.stride)

    def take(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """(C, P) probabilities at the pixels ``(ys[k], xs[k])``: the values of the nearest-upsampled map there."""
        s = self.stride
        return np.asarray(self.prob[:, np.asarray(ys) // s, np.asarray(xs) // s])

    def full(self, h: int, w: int) -> np.ndarray:
        """(C, h, w) at every pixel (nearest upsampling): for the offline tools that index pixels with masks."""
        s = self.stride
        m = self.crop(h, w).prob
        return np.ascontiguousarray(np.repeat(np.repeat(m, s, axis=1), s, axis=2)[:, :h, :w])

    def mirrored(self, axis: int) -> TypeMap:
        """Mirrored along image axis ``axis`` (0: top-bottom, 1: left-right)."""
        return TypeMap(np.flip(self.prob, axis=1 + axis), self.stride)

    def transposed(self) -> TypeMap:
        """Rows and columns swapped."""
        return TypeMap(self.prob.transpose(0, 2, 1), self.stride)
