"""Readers (histoseg.io): metadata of the shared slides, backend agreement, exact resampling, errors, checks.

Real slides come from ``../shared/data/slides`` through the ``shared_data`` fixture (see tests/conftest.py).
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histoseg.errors import (
    ConfigError,
    CorruptSlideError,
    MissingMppError,
    SlideNotFoundError,
    UnsupportedFormatError,
    UnsupportedImageError,
)
from histoseg.io import SlideReader, check_brightfield, open_slide
from histoseg.io.resample import block_mean
from histoseg.types import Box, SlideMeta

CMU1 = "aperio-cmu1-small/CMU-1-Small-Region.svs"
TCGA = "aperio-tcga-jp2k/tcga-cr-7395-01a-01-ts1.svs"
DAPI = "hamamatsu-ndpi-fluorescence/dapi-387.ndpi"
TRITC = "hamamatsu-ndpi-fluorescence/tritc-560.ndpi"
ZARR = "ome-zarr-cmu1-small/CMU-1-Small-Region.ome.zarr"
NDPI_MPP = 0.2281750559028887


@pytest.fixture(scope="session")
def slides(shared_data: Path) -> Path:
    return shared_data / "slides"


class ArrayReader(SlideReader):
    """In-memory one-level slide used to test the resolution logic in isolation."""

    def __init__(self, rgb: np.ndarray, mpp: float | None) -> None:
        self.rgb = rgb
        h, w = rgb.shape[:2]
        self.meta = SlideMeta("mem", "array", "test", ((w, h),), (1.0,), mpp)

    def read_level(self, level: int, box: Box) -> np.ndarray:
        return self._padded(level, box, lambda b: self.rgb[b.y : b.y1, b.x : b.x1].copy())


def _random_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# -- metadata ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "tiffslide", "openslide"])
def test_cmu1_metadata(slides: Path, backend: str) -> None:
    with open_slide(slides / CMU1, backend=backend) as r:
        m = r.meta
        assert m.backend == ("tiffslide" if backend == "auto" else backend)
        assert m.level_dimensions == ((2220, 2967),)
        assert m.level_downsamples == (1.0,)
        assert m.mpp == pytest.approx(0.499)
        assert m.mpp_source == "metadata"
        assert m.objective_power == 20
        assert m.vendor == "aperio"
        assert m.bounds_offset == (0, 0)
        assert all(isinstance(v, str) for v in m.properties.values())


@pytest.mark.parametrize("backend", ["tiffslide", "openslide"])
def test_tcga_jp2k_metadata_has_no_mpp(slides: Path, backend: str) -> None:
    with open_slide(slides / TCGA, backend=backend) as r:
        assert r.meta.level_dimensions == ((4443, 3567), (2221, 1783))
        assert r.meta.level_downsamples[1] == pytest.approx(2.0005, abs=1e-4)
        assert r.meta.mpp is None and r.meta.mpp_source == "none"
        assert r.meta.vendor == "aperio"
        with pytest.raises(MissingMppError, match="--slide-mpp"):
            r.plane_scale(0.5)
        with pytest.raises(MissingMppError, match="--slide-mpp"):
            r.read_plane(Box(0, 0, 8, 8), 0.5)
    with open_slide(slides / TCGA, backend=backend, mpp=0.25) as r:
        assert r.meta.mpp == 0.25 and r.meta.mpp_source == "user"
        assert r.plane_scale(0.5) == 2.0
        assert r.plane_shape(0.5) == (1784, 2222)


@pytest.mark.parametrize("name", [DAPI, TRITC])
@pytest.mark.parametrize("backend", ["tiffslide", "openslide"])
def test_ndpi_metadata(slides: Path, name: str, backend: str) -> None:
    with open_slide(slides / name, backend=backend) as r:
        m = r.meta
        # openslide synthesises 3 more levels below 496x608 than tiffslide exposes
        assert m.level_count == (4 if backend == "tiffslide" else 7)
        assert m.level_dimensions[:4] == ((3968, 4864), (1984, 2432), (992, 1216), (496, 608))
        assert m.level_downsamples[:4] == (1.0, 2.0, 4.0, 8.0)
        assert m.mpp == pytest.approx(NDPI_MPP)
        assert m.objective_power == 40
        assert m.vendor == "hamamatsu"


def test_ome_zarr_uses_array_shapes_not_scale_metadata(slides: Path) -> None:
    with open_slide(slides / ZARR) as r, open_slide(slides / CMU1) as svs:
        assert r.meta.backend == "omezarr"
        assert r.meta.level_dimensions == ((2220, 2967), (574, 768))
        assert r.level_ratio(1) == pytest.approx((2220 / 574, 2967 / 768))  # ~3.87, not the 2x it claims
        assert r.meta.mpp == pytest.approx(0.499) and r.meta.objective_power == 20
        box = Box(1000, 1500, 300, 200)
        assert np.array_equal(r.read_level(0, box), svs.read_level(0, box))
        assert np.array_equal(r.read_plane(box, 1.0), svs.read_plane(box, 1.0))


# -- backends agree ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [CMU1, TCGA, DAPI, TRITC])
def test_tiffslide_and_openslide_pixels_identical(slides: Path, name: str) -> None:
    """Both decode with libjpeg-turbo / OpenJPEG: tolerance 0 on every level box OpenSlide addresses exactly.

    OpenSlide divides level-0 coordinates by a float downsample; on levels whose downsample is not an
    integer (TCGA level 1: 2.0005) only boxes starting at the origin are not sub-pixel shifted by OpenSlide.
    """
    with (
        open_slide(slides / name, backend="tiffslide") as t,
        open_slide(slides / name, backend="openslide") as o,
    ):
        levels = min(t.meta.level_count, o.meta.level_count)
        assert t.meta.level_dimensions[:levels] == o.meta.level_dimensions[:levels]
        for lv in range(levels):
            w, h = t.meta.level_dimensions[lv]
            if lv in o.plane_levels():
                boxes = [Box(0, 0, 256, 256), Box(w // 3, h // 2, 301, 211), Box(w - 100, h - 80, 200, 160)]
            else:
                boxes = [Box(0, 0, min(w, 1024), min(h, 1024))]
            for box in boxes:
                assert np.array_equal(t.read_level(lv, box), o.read_level(lv, box)), (lv, box)


# -- resolution logic --------------------------------------------------------------------------------------


def test_plane_scale_snaps_to_integers() -> None:
    rgb = _random_rgb(40, 50)
    assert ArrayReader(rgb, 0.499).plane_scale(0.5) == 1.0
    assert ArrayReader(rgb, 0.2456).plane_scale(0.5) == 2.0
    assert ArrayReader(rgb, 0.25).plane_scale(1.0) == 4.0
    assert ArrayReader(rgb, 0.4).plane_scale(0.5) == pytest.approx(1.25)
    assert ArrayReader(rgb, 1.0).plane_scale(0.5) == pytest.approx(0.5)
    assert ArrayReader(rgb, 0.25).plane_shape(1.0) == (10, 13)  # ceil(40 / 4), ceil(50 / 4)
    with pytest.raises(MissingMppError, match="--slide-mpp"):
        ArrayReader(rgb, None).plane_scale(0.5)


def test_integer_scale_is_aligned_block_mean() -> None:
    rgb = _random_rgb(64, 48)
    r = ArrayReader(rgb, 0.25)
    out = r.read_plane(Box(0, 0, 12, 16), 1.0)  # scale 4
    ref = (rgb.reshape(16, 4, 12, 4, 3).astype(np.int64).sum(axis=(1, 3)) + 8) // 16
    assert np.array_equal(out, ref.astype(np.uint8))
    assert np.array_equal(block_mean(rgb, 4, 4), out)
    assert np.array_equal(r.read_plane(Box(0, 0, 48, 64), 0.25), rgb)  # scale 1: plain copy


@pytest.mark.parametrize(
    ("name", "backend", "user_mpp", "mpp"),
    [
        (CMU1, "tiffslide", None, 1.0),  # scale 2.004 -> 2: 2x2 means of level 0
        (CMU1, "tiffslide", None, 0.75),  # scale 1.503: bilinear on the global grid
        (CMU1, "openslide", None, 2.2),  # scale 4.41: 4x4 pre-reduction + bilinear
        (CMU1, "tiffslide", None, 0.3),  # scale 0.6: upsampling
        (TCGA, "tiffslide", 0.25, 0.6),  # scale 2.4 from level 1 (ratio 2.0005): r = 1.2
        (DAPI, "tiffslide", None, 1.0),  # scale 4.38 from level 2: bilinear
        (DAPI, "openslide", None, 0.9127),  # scale 4.0: level 2 copied as is
    ],
)
def test_read_plane_is_translation_exact(
    slides: Path, name: str, backend: str, user_mpp: float | None, mpp: float
) -> None:
    with open_slide(slides / name, backend=backend, mpp=user_mpp) as r:
        ph, pw = r.plane_shape(mpp)
        big_box = Box(pw // 2 - 300, ph // 2 - 250, 600, 500)
        edge_box = Box(pw - 150, ph - 120, 200, 180)  # runs past the slide
        for outer in (big_box, edge_box):
            big = r.read_plane(outer, mpp)
            assert big.shape == (outer.h, outer.w, 3) and big.dtype == np.uint8
            for dx, dy, w, h in [(0, 0, 64, 64), (17, 33, 129, 97), (outer.w - 75, outer.h - 61, 75, 61)]:
                small = r.read_plane(Box(outer.x + dx, outer.y + dy, w, h), mpp)
                assert np.array_equal(small, big[dy : dy + h, dx : dx + w]), (outer, dx, dy)
        tail = r.read_plane(Box(pw, ph, 10, 10), mpp)
        assert (tail == 255).all()


@pytest.mark.parametrize("mpp", [0.75, 2.2, 0.3])
def test_read_plane_geometry_matches_opencv(slides: Path, mpp: float) -> None:
    """Non-integer scales sample pixel centres at (i + 0.5) * r - 0.5, as an independent cv2.warpAffine does
    (after the same floor(r) box pre-reduction); only the 1/32-pixel weight quantisation differs."""
    import cv2

    with open_slide(slides / CMU1) as r:
        s = r.plane_scale(mpp)
        ph, pw = r.plane_shape(mpp)
        box = Box(pw // 4, ph // 4, min(500, pw // 2), min(400, ph // 2))
        plane = r.read_plane(box, mpp).astype(np.int16)
        src = r.read_level(0, Box(0, 0, *r.meta.dimensions))
        f = int(s) if s >= 2 else 1
        h, w = src.shape[0] // f * f, src.shape[1] // f * f
        src = block_mean(np.ascontiguousarray(src[:h, :w]), f, f)
        q = s / f
        m = np.array([[q, 0, (box.x + 0.5) * q - 0.5], [0, q, (box.y + 0.5) * q - 0.5]])
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        ref = cv2.warpAffine(src, m, (box.w, box.h), flags=flags).astype(np.int16)
        d = np.abs(plane - ref)
        assert d.mean() < 0.5 and d.max() <= 4


@pytest.mark.parametrize("mpp", [0.5, 0.37, 1.3])
def test_internal_chunking_is_invisible(monkeypatch: pytest.MonkeyPatch, mpp: float) -> None:
    """Row strips (memory bound) and remap chunks (int16 maps) do not change a single pixel."""
    import histoseg.io.base as base_mod
    import histoseg.io.resample as resample_mod

    r = ArrayReader(_random_rgb(300, 260, seed=3), 0.25)
    box = Box(-7, -5, 150, 131)
    whole = r.read_plane(box, mpp)
    monkeypatch.setattr(base_mod, "_PLANE_CHUNK_BYTES", 5000)
    monkeypatch.setattr(resample_mod, "_MAX_REMAP_CHUNK", 7)
    assert np.array_equal(r.read_plane(box, mpp), whole)


def test_read_region_covers_level0_box(slides: Path) -> None:
    with open_slide(slides / CMU1) as r:
        a = r.read_region(Box(101, 203, 400, 300), 1.0)  # scale 2: plane box [50, 251) x [101, 252)
        assert a.shape == (151, 201, 3)
        assert np.array_equal(a, r.read_plane(Box(50, 101, 201, 151), 1.0))


@pytest.mark.parametrize("backend", ["tiffslide", "openslide"])
def test_out_of_bounds_is_white(slides: Path, backend: str) -> None:
    with open_slide(slides / CMU1, backend=backend) as r:
        w, h = r.meta.dimensions
        assert (r.read_level(0, Box(w + 5, 0, 50, 40)) == 255).all()
        assert (r.read_level(0, Box(-100, -100, 50, 50)) == 255).all()
        part = r.read_level(0, Box(-20, h - 30, 60, 50))
        inside = r.read_level(0, Box(0, h - 30, 40, 30))
        assert (part[:, :20] == 255).all() and (part[30:] == 255).all()
        assert np.array_equal(part[:30, 20:], inside)
        assert (r.read_plane(Box(-30, -30, 30, 30), 1.0) == 255).all()


def test_thumbnail(slides: Path) -> None:
    with open_slide(slides / CMU1) as r:
        thumb, f = r.thumbnail(512)
        assert thumb.shape == (512, 383, 3) and thumb.dtype == np.uint8
        assert f == pytest.approx(2967 / 512)
        small, f1 = r.thumbnail(4096)  # larger than the slide: the slide itself
        assert small.shape == (2967, 2220, 3) and f1 == 1.0
    with open_slide(slides / TCGA) as r:
        thumb, f = r.thumbnail(1024)
        assert thumb.shape == (822, 1024, 3) and f == pytest.approx(4443 / 1024)
        ref = r.read_level(1, Box(0, 0, 2221, 1783)).mean(axis=(0, 1))
        assert np.abs(thumb.mean(axis=(0, 1)) - ref).max() < 2


def test_concurrent_reads_from_threads(slides: Path) -> None:
    with open_slide(slides / CMU1) as r:
        boxes = [Box(x, y, 200, 200) for x in range(0, 2000, 500) for y in range(0, 2800, 700)]
        serial = [r.read_level(0, b) for b in boxes]
        with ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(lambda b: r.read_level(0, b), boxes * 2))
        assert all(np.array_equal(a, b) for a, b in zip(serial * 2, parallel, strict=True))


# -- plain images ------------------------------------------------------------------------------------------


def test_png_is_a_one_level_slide(slides: Path, tmp_path: Path) -> None:
    with open_slide(slides / CMU1) as svs:
        tissue = svs.read_level(0, Box(600, 900, 320, 240))
    rgba = np.dstack([tissue, np.full(tissue.shape[:2], 255, np.uint8)])
    rgba[:10, :10, 3] = 0  # transparent corner -> white
    Image.fromarray(rgba).save(tmp_path / "tile.png")
    Image.fromarray(tissue[:, :, 1]).save(tmp_path / "gray.png")
    with open_slide(tmp_path / "tile.png") as r:
        assert r.meta.backend == "image" and r.meta.level_dimensions == ((320, 240),)
        assert r.meta.mpp is None and r.meta.mpp_source == "none"
        with pytest.raises(MissingMppError, match="--slide-mpp"):
            r.read_plane(Box(0, 0, 10, 10), 0.5)
        px = r.read_level(0, Box(0, 0, 320, 240))
        assert (px[:10, :10] == 255).all() and np.array_equal(px[10:], tissue[10:])
    with open_slide(tmp_path / "tile.png", mpp=0.499) as r:
        assert r.meta.mpp_source == "user" and r.plane_scale(0.5) == 1.0
        assert np.array_equal(r.read_plane(Box(10, 10, 300, 220), 0.5), tissue[10:230, 10:310])
        assert (r.read_plane(Box(310, 0, 20, 20), 0.5)[:, 10:] == 255).all()
    with open_slide(tmp_path / "gray.png") as r:
        g = r.read_level(0, Box(0, 0, 320, 240))
        assert np.array_equal(g, np.repeat(tissue[:, :, 1:2], 3, axis=2))


def test_single_page_tiff_goes_to_image_backend(tmp_path: Path) -> None:
    import tifffile

    rgb = _random_rgb(30, 40)
    tifffile.imwrite(tmp_path / "plain.tif", rgb)
    with open_slide(tmp_path / "plain.tif") as r:
        assert r.meta.backend == "image" and r.meta.mpp is None
        assert np.array_equal(r.read_level(0, Box(0, 0, 40, 30)), rgb)


# -- errors ------------------------------------------------------------------------------------------------


def test_missing_directory_and_unknown_files(tmp_path: Path, slides: Path) -> None:
    with pytest.raises(SlideNotFoundError):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(FileNotFoundError):  # SlideNotFoundError is also a FileNotFoundError
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(UnsupportedFormatError, match="directory"):
        open_slide(tmp_path)
    (tmp_path / "notes.txt").write_text("not a slide\n")
    with pytest.raises(UnsupportedFormatError, match="not a supported format"):
        open_slide(tmp_path / "notes.txt")
    with pytest.raises(UnsupportedFormatError, match="directory"):
        open_slide(slides / ZARR, backend="tiffslide")
    with pytest.raises(ConfigError):
        open_slide(slides / CMU1, backend="bioformats")
    with pytest.raises(ConfigError, match="--slide-mpp"):
        open_slide(slides / CMU1, mpp=-1.0)


def test_random_bytes_named_svs_is_corrupt(tmp_path: Path) -> None:
    p = tmp_path / "random.svs"
    p.write_bytes(np.random.default_rng(1).bytes(20000))
    with pytest.raises(CorruptSlideError, match="damaged or truncated"):
        open_slide(p)
    with pytest.raises(CorruptSlideError):
        open_slide(p, backend="openslide")


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.95])
def test_truncated_svs_is_corrupt(slides: Path, tmp_path: Path, fraction: float) -> None:
    """Truncation anywhere in the pyramid data: caught at open (data offsets beyond the end of file)."""
    src = slides / TCGA
    data = src.read_bytes()
    p = tmp_path / "truncated.svs"
    p.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CorruptSlideError):
        open_slide(p)


def test_damaged_tiles_fail_at_open_or_first_read(slides: Path, tmp_path: Path) -> None:
    import tifffile

    src = slides / CMU1
    with tifffile.TiffFile(src) as tf:
        page = tf.pages.first
        first, last = int(min(page.dataoffsets)), int(page.offset)
    p = tmp_path / "damaged.svs"
    shutil.copy(src, p)
    data = bytearray(p.read_bytes())
    data[first + 1000 : last - 1000] = bytes(last - 2000 - first)
    p.write_bytes(bytes(data))
    for backend in ("auto", "tiffslide", "openslide"):
        with pytest.raises(CorruptSlideError):
            with open_slide(p, backend=backend) as r:
                r.read_level(0, Box(1000, 1500, 64, 64))


# -- content checks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [CMU1, TCGA, ZARR])
def test_brightfield_slides_pass(slides: Path, name: str) -> None:
    with open_slide(slides / name) as r:
        check_brightfield(r)


@pytest.mark.parametrize("name", [DAPI, TRITC])
def test_fluorescence_slides_are_refused(slides: Path, name: str) -> None:
    with open_slide(slides / name) as r:
        with pytest.raises(UnsupportedImageError, match="brightfield H&E"):
            check_brightfield(r)
