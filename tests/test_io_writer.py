"""Pyramid writer (histoseg.io.writer): round trips through both TiffSlide and OpenSlide.

No real multi-level H&E slide with mpp is small enough to ship, so these tests build one: real tissue from
the shared CMU-1-Small-Region.svs tiled into larger pyramidal TIFFs with the project's own writer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import histoseg.io.writer as writer_mod
from histoseg.errors import ConfigError
from histoseg.io import open_slide, write_pyramidal_tiff
from histoseg.io.resample import block_mean
from histoseg.types import Box

CMU1 = "aperio-cmu1-small/CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def tissue(shared_data: Path) -> np.ndarray:
    with open_slide(shared_data / "slides" / CMU1) as r:
        return r.read_level(0, Box(0, 0, *r.meta.dimensions))


def tiled_source(tissue: np.ndarray) -> Callable[[Box], np.ndarray]:
    """Level-0 pixels of an endless mirror-free repetition of the CMU-1 tissue (no full array held)."""
    th, tw = tissue.shape[:2]

    def fetch(b: Box) -> np.ndarray:
        ys = np.arange(b.y, b.y1) % th
        xs = np.arange(b.x, b.x1) % tw
        return tissue[ys][:, xs]

    return fetch


def _pad_even(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    out = np.full((h + h % 2, w + w % 2, 3), 255, np.uint8)
    out[:h, :w] = a
    return out


def test_jpeg_round_trip_both_backends(tissue: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "big.svs"
    src = tiled_source(tissue)
    write_pyramidal_tiff(path, src, (3000, 3000), 0.499, magnification=20)
    ref = src(Box(0, 0, 3000, 3000)).astype(np.int64)
    pixels = {}
    for backend in ("tiffslide", "openslide"):
        with open_slide(path, backend=backend) as r:
            m = r.meta
            assert m.level_count >= 3
            assert m.level_dimensions == ((3000, 3000), (1500, 1500), (750, 750), (375, 375))
            assert m.mpp == pytest.approx(0.499) and m.mpp_source == "metadata"
            assert m.objective_power == 20 and m.vendor == "aperio"
            lv0 = r.read_level(0, Box(0, 0, 3000, 3000))
            d = np.abs(lv0.astype(np.int64) - ref)
            # JPEG q90 with 4:2:0 chroma: small mean error; large errors only at the tiling seams' sharp edges
            assert d.mean() < 3.0 and np.percentile(d, 99) < 25
            pixels[backend] = (lv0, r.read_level(2, Box(0, 0, 750, 750)))
            assert r.plane_scale(2.0) == 4.0  # 0.499 -> 2.0 µm: level 2 copied as is
            assert np.array_equal(
                r.read_plane(Box(100, 200, 300, 250), 2.0), pixels[backend][1][200:450, 100:400]
            )
    # both decoders agree exactly on our files (libjpeg-turbo in both)
    assert np.array_equal(pixels["tiffslide"][0], pixels["openslide"][0])
    assert np.array_equal(pixels["tiffslide"][1], pixels["openslide"][1])


def test_lossless_pyramid_is_exact(tissue: np.ndarray, tmp_path: Path) -> None:
    """zlib: level 0 == source; each level == 2x2 means of the previous one (white beyond odd edges)."""
    w, h = 1000, 701
    arr = tiled_source(tissue)(Box(0, 0, w, h))
    path = tmp_path / "lossless.tif"
    write_pyramidal_tiff(path, arr, (w, h), 0.25, tile=128, compression="zlib", min_level_size=100)
    with open_slide(path, backend="tiffslide") as r, open_slide(path, backend="openslide") as o:
        assert r.meta.level_dimensions == ((1000, 701), (500, 351), (250, 176), (125, 88), (63, 44))
        assert r.meta.mpp == pytest.approx(0.25) and r.meta.objective_power is None
        prev = arr
        for lv, (lw, lh) in enumerate(r.meta.level_dimensions):
            got = r.read_level(lv, Box(0, 0, lw, lh))
            want = prev if lv == 0 else block_mean(_pad_even(prev), 2, 2)
            assert np.array_equal(got, want), lv
            assert np.array_equal(o.read_level(lv, Box(0, 0, lw, lh)), want), lv
            prev = got


def test_callable_source_equals_array_source(
    tissue: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Strip-wise pulling and memory-mapped reduced levels give the same pixels as an in-memory array."""
    w, h = 1300, 900
    src = tiled_source(tissue)
    write_pyramidal_tiff(
        tmp_path / "a.tif", src(Box(0, 0, w, h)), (w, h), 0.5, compression="zlib", min_level_size=200
    )
    monkeypatch.setattr(writer_mod, "IN_MEMORY_LEVEL_BYTES", 0)  # force the temporary memmap path
    write_pyramidal_tiff(tmp_path / "b.tif", src, (w, h), 0.5, compression="zlib", min_level_size=200)
    with open_slide(tmp_path / "a.tif") as a, open_slide(tmp_path / "b.tif") as b:
        assert a.meta.level_dimensions == b.meta.level_dimensions
        for lv, (lw, lh) in enumerate(a.meta.level_dimensions):
            assert np.array_equal(a.read_level(lv, Box(0, 0, lw, lh)), b.read_level(lv, Box(0, 0, lw, lh)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "b.tif"]  # no temporaries left


def test_thumbnail_page_and_layout(tissue: np.ndarray, tmp_path: Path) -> None:
    import openslide
    import tifffile

    path = tmp_path / "t.svs"
    write_pyramidal_tiff(path, tiled_source(tissue), (2500, 1200), 0.5, min_level_size=256)
    with tifffile.TiffFile(path) as tf:
        pages = [p for p in tf.pages if isinstance(p, tifffile.TiffPage)]
        assert len(pages) == len(tf.pages) == 6  # level 0, thumbnail, levels 1..4 (down to 157 <= 256)
        assert pages[-1].shape == (75, 157, 3)
        assert pages[0].description.startswith("Aperio Image Library")
        assert "|MPP = 0.5" in pages[0].description and "AppMag" not in pages[0].description
        assert pages[0].is_tiled and not pages[1].is_tiled
        assert pages[1].shape == (300, 625, 3)  # level 0 halved until the longest side is <= 1024
        assert all(p.is_tiled for p in pages[2:])
    with openslide.OpenSlide(str(path)) as o:
        assert "thumbnail" in o.associated_images


def test_failed_write_leaves_nothing(tissue: np.ndarray, tmp_path: Path) -> None:
    target = tmp_path / "out.svs"
    target.write_bytes(b"previous")
    src = tiled_source(tissue)

    def broken(b: Box) -> np.ndarray:
        if b.y >= 512:
            raise RuntimeError("source failed")
        return src(b)

    with pytest.raises(RuntimeError, match="source failed"):
        write_pyramidal_tiff(target, broken, (1000, 1000), 0.5)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.svs"]


def test_invalid_arguments(tmp_path: Path) -> None:
    arr = np.zeros((10, 12, 3), np.uint8)
    with pytest.raises(ConfigError, match="compression"):
        write_pyramidal_tiff(tmp_path / "x.tif", arr, (12, 10), 0.5, compression="lzw")
    with pytest.raises(ConfigError, match="tile"):
        write_pyramidal_tiff(tmp_path / "x.tif", arr, (12, 10), 0.5, tile=100)
    with pytest.raises(ValueError, match="source array"):
        write_pyramidal_tiff(tmp_path / "x.tif", arr, (10, 12), 0.5)
    with pytest.raises(ConfigError, match="mpp"):
        write_pyramidal_tiff(tmp_path / "x.tif", arr, (12, 10), 0.0)
    assert list(tmp_path.iterdir()) == []
