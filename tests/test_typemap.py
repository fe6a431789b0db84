"""The type map on the type head's grid (models.typemap), on hand-built cells with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from histoseg.errors import ModelError
from histoseg.models.typemap import TypeMap


def _cells() -> TypeMap:
    """Two classes on a 2 x 3 grid at stride 4: class 0 counts the cells 0..5 in raster order, class 1 is 10x."""
    c = np.arange(6, dtype=np.float32).reshape(2, 3)
    return TypeMap(np.stack([c, 10 * c]), 4)


def test_a_pixel_reads_its_cell() -> None:
    m = _cells()
    ys, xs = np.array([0, 3, 4, 7, 4]), np.array([0, 3, 4, 11, 8])
    # (0,0) and (3,3) lie in cell (0,0); (4,4) in (1,1) = 4; (7,11) in (1,2) = 5; (4,8) in (1,2) = 5
    assert m.take(ys, xs).tolist() == [[0, 0, 4, 5, 5], [0, 0, 40, 50, 50]]
    full = m.full(8, 12)
    assert full.shape == (2, 8, 12) and full[0, 5, 9] == 5 and full[1, 3, 4] == 10
    assert np.array_equal(full[:, ys, xs], m.take(ys, xs))


def test_a_crop_keeps_the_cells_that_cover_the_pixels() -> None:
    m = _cells()
    assert m.cells(5, 9) == (2, 3) and m.cells(4, 8) == (1, 2) and m.cells(1, 1) == (1, 1)
    assert m.crop(4, 8).prob.shape == (2, 1, 2) and m.crop(5, 9).prob.shape == (2, 2, 3)
    assert m.full(5, 9).shape == (2, 5, 9) and m.full(5, 9)[0, 4, 8] == 5
    assert m.covers(8, 12) and not m.covers(9, 12) and not m.covers(8, 13)
    with pytest.raises(ModelError, match="does not cover 9x12 pixels"):
        m.crop(9, 12)  # e.g. a graph exported by another version that gave another grid


def test_mirrors_and_transpose_of_the_cells_are_those_of_the_pixels() -> None:
    """On an image whose sides are multiples of the stride, mirroring or transposing the cells and upsampling gives
    the upsampled map mirrored or transposed."""
    m = _cells()
    full = m.full(8, 12)
    assert np.array_equal(m.mirrored(0).full(8, 12), full[:, ::-1])
    assert np.array_equal(m.mirrored(1).full(8, 12), full[:, :, ::-1])
    assert np.array_equal(m.transposed().full(12, 8), full.transpose(0, 2, 1))
    assert m.mirrored(1).prob[0].tolist() == [[2, 1, 0], [5, 4, 3]]


def test_a_type_map_is_three_dimensional_with_a_positive_stride() -> None:
    with pytest.raises(ModelError, match=r"\(C, h, w\)"):
        TypeMap(np.zeros((3, 4), np.float32), 4)
    with pytest.raises(ModelError, match="stride >= 1"):
        TypeMap(np.zeros((1, 3, 4), np.float32), 0)
    assert TypeMap(np.zeros((3, 1, 1), np.float32), 2).n_types == 3


def test_engine_cache_keys_follow_the_graph_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exported graph's outputs changed (the type map's grid): a graph cached by an older version has another
    key, so it is never compiled for this one."""
    from histoseg.inference import predict
    from histoseg.models import resolve_model

    art = resolve_model("default")
    now = predict._content_key(art)
    monkeypatch.setattr(predict, "_DIGESTS", {})
    monkeypatch.setattr(predict, "GRAPH_VERSION", predict.GRAPH_VERSION - 1)
    assert predict._content_key(art) != now
