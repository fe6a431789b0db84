"""Test-time view averaging (``--views``): the network's maps averaged over flipped and transposed copies.

A convolutional network is not exactly equivariant to flips and 90-degree turns, so its errors differ from
view to view and the mean of the maps is better than one (HoVer-Net-style pipelines call it test-time
augmentation; this project's ``--tta`` is test-time *adaptation*, hence the other name). Measured with
``histoseg evaluate --precision fp32`` on a 2-core Intel Xeon (AVX-512; README, ``--views``): 4 views raise the
typed model's MoNuSeg-test PQ from 0.588 to 0.603 at 4x the network time, so it is an option, not the
default. The card's post-processing thresholds and type weights were fitted with one view and are used as
they are.

Views are the elements of the square's symmetry group applied to the input: ``1`` = the image, ``4`` = also
mirrored left-right, top-bottom and both, ``8`` = those four of the transposed image too. Each view's maps are
brought back to the image's frame: a left-right mirror negates the horizontal map (channel 0 of HV, x), a
top-bottom mirror the vertical one, a transpose swaps the two. The sum runs in a fixed order, so it is
deterministic.

Exact at region borders: the input is padded to the network stride *before* it is mirrored, so every view's
sampling grid is anchored on the plane's stride grid (region boxes start on it) and a pixel gets the same
maps from every region that computes it, whatever the region size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from histoseg.config import check_views
from histoseg.errors import ModelError
from histoseg.models.inputs import pad_to_stride
from histoseg.models.typemap import TypeMap

_VIEWS = {  # (transpose, mirror left-right, mirror top-bottom), in summation order; keys: VIEW_CHOICES
    1: ((False, False, False),),
    4: ((False, False, False), (False, True, False), (False, False, True), (False, True, True)),
    8: tuple((t, fx, fy) for t in (False, True) for fx in (False, True) for fy in (False, True)),
}

Maps = tuple[np.ndarray, np.ndarray, TypeMap | None]
"""NP probability (H, W), HV (2, H, W), and the type probabilities on the type head's grid (or None)."""


DIHEDRAL = _VIEWS[8]
"""The eight dihedral views (transpose, mirror left-right, mirror top-bottom), in :func:`to_view`'s terms."""


def to_view(image: np.ndarray, t: bool, fx: bool, fy: bool) -> np.ndarray:
    """(H, W, ...) array (an image, a label map) -> the view: transposed (``t``), then mirrored left-right
    (``fx``), then top-bottom."""
    if t:
        image = np.swapaxes(image, 0, 1)
    if fx:
        image = image[:, ::-1]
    if fy:
        image = image[::-1]
    return np.ascontiguousarray(image)


def _from_view(maps: Maps, t: bool, fx: bool, fy: bool) -> Maps:
    """A view's maps -> the image's frame: :func:`to_view`'s steps undone in reverse order; undoing a mirror
    also negates the HV channel along it (0 = x, 1 = y), undoing the transpose swaps the two channels."""
    np_prob, hv, tp = maps
    hv = hv.copy()
    if fy:
        np_prob, hv, tp = np_prob[::-1], hv[:, ::-1], None if tp is None else tp.mirrored(0)
        hv[1] = -hv[1]
    if fx:
        np_prob, hv, tp = np_prob[:, ::-1], hv[:, :, ::-1], None if tp is None else tp.mirrored(1)
        hv[0] = -hv[0]
    if t:
        np_prob, hv, tp = np_prob.T, hv[::-1].transpose(0, 2, 1), None if tp is None else tp.transposed()
    return np_prob, hv, tp


def view_maps(run: Callable[[np.ndarray], Maps], image: np.ndarray, views: int) -> Iterator[Maps]:
    """Each view's maps of ``image``, in the image's frame and at its size, the identity view first, one at a
    time: what :func:`run_views` averages, and what a check of the network's consistency across views
    compares (``tta.guard.view_agreement``)."""
    check_views(views, "views")
    h, w = image.shape[:2]
    padded = pad_to_stride(image)
    for t, fx, fy in _VIEWS[views]:
        np_prob, hv, tp = _from_view(run(to_view(padded, t, fx, fy)), t, fx, fy)
        yield np_prob[:h, :w], hv[:, :h, :w], None if tp is None else tp.crop(h, w)


def run_views(run: Callable[[np.ndarray], Maps], image: np.ndarray, views: int = 1) -> Maps:
    """The maps of ``image`` ((H, W, 3) RGB) averaged over ``views`` views; ``run`` maps an RGB array to (NP
    probability, HV, type probabilities or None) of its size (with 1 view it gets ``image`` itself, with more
    the stride-padded image's views). The type maps are averaged on their own grid (``models.typemap``)."""
    check_views(views, "views")
    if views == 1:
        return run(image)
    sums: list[np.ndarray | None] = [None, None, None]
    stride = 1
    for np_view, hv_view, tp_view in view_maps(run, image, views):  # one view at a time: a region's maps are large
        if tp_view is not None:
            stride = tp_view.stride
        for i, m in enumerate((np_view, hv_view, None if tp_view is None else tp_view.prob)):
            if m is not None:
                s = sums[i]
                if s is None:
                    sums[i] = m.astype(np.float32)  # a copy: the engine's arrays are never written to
                else:
                    s += m
    np_sum, hv_sum, tp_sum = sums
    if np_sum is None or hv_sum is None:
        raise ModelError("the network gave no NP or HV maps")
    scale = np.float32(1.0 / views)
    np_prob = np.ascontiguousarray(np_sum * scale)
    hv = np.ascontiguousarray(hv_sum * scale)
    tp = None if tp_sum is None else TypeMap(np.ascontiguousarray(tp_sum * scale), stride)
    return np_prob, hv, tp
