"""Tests of ``histoseg.tiling``: region planning (stitching rule 1) and the thumbnail tissue mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from histoseg.errors import ConfigError
from histoseg.io import open_slide
from histoseg.models.arch import STRIDE
from histoseg.stitching import in_tissue, owned_mask
from histoseg.tiling import TISSUE_CELL, plan_regions, tissue_cells, tissue_mask
from histoseg.types import Box, Region

CMU1 = Path("slides") / "aperio-cmu1-small" / "CMU-1-Small-Region.svs"

# ---------------------------------------------------------------------------------------------------
# plan_regions without a mask


@pytest.mark.parametrize(
    ("plane", "size", "grid"),
    [
        ((1000, 1300), 256, (4, 6)),  # neither side a multiple of the region size
        ((512, 768), 256, (2, 3)),  # both sides multiples: no empty extra row or column
        ((100, 50), 256, (1, 1)),  # plane smaller than one region
        ((17, 1), 4, (5, 1)),
    ],
)
def test_cores_partition_the_plane(plane: tuple[int, int], size: int, grid: tuple[int, int]) -> None:
    regions = plan_regions(plane, size, halo=0)
    assert len(regions) == grid[0] * grid[1]
    counter = np.zeros(plane, dtype=np.int32)
    for r in regions:
        c = r.core
        assert c.w == c.h == size
        assert c.x < plane[1] and c.y < plane[0]  # every core holds at least one plane pixel
        counter[c.y : c.y1, c.x : c.x1] += 1  # numpy clips the slice at the plane edge
    assert counter.min() == 1 and counter.max() == 1  # every pixel in exactly one core


def test_regions_raster_order_core_boxes_halo_and_read_box() -> None:
    size, halo = 256, 48
    regions = plan_regions((1000, 1300), size, halo)
    assert [(r.row, r.col) for r in regions] == [(i, j) for i in range(4) for j in range(6)]
    keys = [r.key for r in regions]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for r in regions:
        assert r.core == Box(r.col * size, r.row * size, size, size)
        assert r.halo == halo
        assert r.read == Box(r.core.x - halo, r.core.y - halo, size + 2 * halo, size + 2 * halo)
    # the read box of the first region reaches past the plane (it is padded when read)
    assert regions[0].read.x == -halo and regions[0].read.y == -halo


def test_zero_halo_read_box_is_the_core() -> None:
    for r in plan_regions((300, 300), 128, 0):
        assert r.read == r.core


@pytest.mark.parametrize(("size", "halo"), [(0, 16), (-256, 16), (256, -1)])
def test_invalid_region_size_or_halo(size: int, halo: int) -> None:
    with pytest.raises(ConfigError):
        plan_regions((1000, 1000), size, halo)


# ---------------------------------------------------------------------------------------------------
# tissue filtering with hand-made masks


def _rc(regions: list[Region]) -> list[tuple[int, int]]:
    return [(r.row, r.col) for r in regions]


def test_tissue_filter_keeps_exactly_the_cores_with_tissue() -> None:
    # plane 1000 x 1300, regions of 256: a 4 x 6 grid; mask at 1/4 resolution (250 x 325), so a core
    # is 64 x 64 mask pixels and the last row (plane 768..1000 -> mask 192..250) and the last column
    # (plane 1280..1300 -> mask 320..325) are partial
    mask = np.zeros((250, 325), dtype=bool)
    mask[20:30, 20:30] = True  # cell (0, 0)
    mask[90:100, 3 * 64 + 25 : 3 * 64 + 40] = True  # cell (1, 3)
    mask[220:225, 321:324] = True  # cell (3, 5), the partial corner cell
    mask[150, 100] = True  # a single pixel in cell (2, 1)
    regions = plan_regions((1000, 1300), 256, 32, tissue_cells(mask, (1000, 1300)))
    assert _rc(regions) == [(0, 0), (1, 3), (2, 1), (3, 5)]  # raster order kept
    for r in regions:
        assert r.core == Box(r.col * 256, r.row * 256, 256, 256) and r.halo == 32


def test_tissue_filter_all_or_nothing_at_odd_mask_scale() -> None:
    plane = (1000, 1300)
    n = 4 * 6
    for shape in [(97, 131), (250, 325), (1000, 1300), (13, 7)]:
        assert len(plan_regions(plane, 256, 0, tissue_cells(np.ones(shape, bool), plane))) == n
        assert plan_regions(plane, 256, 0, tissue_cells(np.zeros(shape, bool), plane)) == []


def test_min_tissue_fraction_is_per_cell() -> None:
    # plane 512 x 768 (2 x 3 cores of 256) at half resolution: a 32-px tissue cell is 16 x 16 mask pixels
    plane = (512, 768)
    mask = np.zeros((256, 384), dtype=bool)
    mask[2:126, 2:126] = True  # core (0, 0): cells 1..6 fully covered (after the 3x3 dilation too)
    mask[180:190, 300:310] = True  # core (1, 2): a 10 x 10 blob, 12 x 12 dilated: at most 33 % of a cell
    assert _rc(plan_regions(plane, 256, 0, tissue_cells(mask, plane))) == [(0, 0), (1, 2)]
    assert _rc(plan_regions(plane, 256, 0, tissue_cells(mask, plane, 0.5))) == [(0, 0)]
    cells = tissue_cells(mask, plane, 0.999)
    assert cells[1:7, 1:7].all() and cells.sum() == 36  # only fully covered cells
    assert _rc(plan_regions(plane, 256, 0, cells)) == [(0, 0)]


def test_thin_strip_across_a_region_border_is_kept_at_every_region_size() -> None:
    """A 1-cell-wide tissue strip along a core border: every region size runs the regions that hold it, and
    the nuclei kept (anchor in a tissue cell) are the same set whatever the region size."""
    plane = (1024, 1024)
    mask = np.zeros((256, 256), dtype=bool)  # 4 plane px per mask px
    mask[:, 126:130] = True  # plane x 504..520: crosses the x=512 border of 256- and 512-px cores
    cells = tissue_cells(mask, plane)
    anchors = np.array([[100, 510], [700, 515], [300, 100], [900, 1000]])  # (y, x); two in the strip
    kept = in_tissue(anchors, cells, TISSUE_CELL)
    assert kept.tolist() == [True, True, False, False]
    for size in (256, 512, 1024):
        regions = plan_regions(plane, size, 0, cells)
        for y, x in anchors[kept]:
            assert any(r.core.contains(x, y) for r in regions), (size, y, x)


def test_tissue_box_is_the_bounding_box_of_the_cores_tissue_cells() -> None:
    """A region reads and owns the bounding box of its core's tissue cells (plus the halo), not the whole core;
    nuclei anchored in the core outside that box are not its own (they are not in tissue)."""
    plane, halo = (512, 768), 32
    cells = np.zeros((16, 24), bool)
    cells[2, 3] = cells[5, 6] = True  # core (0, 0): cells rows 2..5, cols 3..6
    cells[10, 20] = True  # core (1, 2): one cell
    regions = plan_regions(plane, 256, halo, cells)
    assert _rc(regions) == [(0, 0), (1, 2)]
    a, b = regions
    assert a.core == Box(0, 0, 256, 256) and a.tissue == Box(96, 64, 128, 128) and a.owns == a.tissue
    assert a.read == Box(64, 32, 192, 192)
    assert b.tissue == Box(640, 320, 32, 32) and b.read == Box(608, 288, 96, 96)
    anchors = np.array([[64.0, 96.0], [191.9, 223.9], [10.0, 10.0], [100.0, 230.0]])  # (y, x)
    assert owned_mask(anchors, a).tolist() == [True, True, False, False]
    assert Region(0, 0, Box(0, 0, 256, 256), halo).owns == Box(0, 0, 256, 256)  # no mask: the whole core


@pytest.mark.parametrize("seed", range(3))
def test_tissue_boxes_cover_every_tissue_cell_once_on_the_stride_grid(seed: int) -> None:
    """At every region size the tissue boxes are disjoint, lie in their cores, contain every tissue cell, and
    their read boxes start on the network's stride grid (so the network's output at a pixel is the same)."""
    rng = np.random.default_rng(seed)
    plane = (1000, 1300)
    cells = ndi.binary_opening(rng.random((32, 41)) < 0.5)
    halo = 192
    assert TISSUE_CELL % STRIDE == 0 and halo % STRIDE == 0
    for size in (256, 512, 1024):
        count = np.zeros(cells.shape, int)
        for r in plan_regions(plane, size, halo, cells):
            o = r.owns
            assert r.core.intersect(o) == o and o.x % TISSUE_CELL == 0 and o.y % TISSUE_CELL == 0
            assert r.read.x % STRIDE == 0 and r.read.y % STRIDE == 0
            count[o.y // TISSUE_CELL : o.y1 // TISSUE_CELL, o.x // TISSUE_CELL : o.x1 // TISSUE_CELL] += 1
        assert count.max() == 1 and (count[cells] == 1).all(), size


# ---------------------------------------------------------------------------------------------------
# tissue_mask


def test_tissue_mask_on_cmu1_thumbnail(shared_data: Path) -> None:
    with open_slide(shared_data / CMU1) as slide:
        thumb, factor = slide.thumbnail(1024)
    assert thumb.shape == (1024, 766, 3) and thumb.dtype == np.uint8
    assert factor == pytest.approx(2967 / 1024)
    mask = tissue_mask(thumb)
    assert mask.shape == thumb.shape[:2] and mask.dtype == bool
    # CMU-1-Small-Region: one strip of H&E skin running top to bottom through the middle, glass on
    # both sides; by eye about 35-40 % of the thumbnail. Accept 25-55 %.
    frac = float(mask.mean())
    assert 0.25 < frac < 0.55, frac
    assert mask[700:800, 350:450].all()  # inside the tissue strip
    assert not mask[480:700, :150].any()  # glass, left of the strip
    assert not mask[500:, 700:].any()  # glass, right edge
    # tissue is largely one connected piece: the largest component holds most of it
    lab, n = ndi.label(mask)
    assert n >= 1
    assert np.bincount(lab.ravel())[1:].max() > 0.9 * mask.sum()


def test_tissue_mask_white_and_grey_glass_are_empty() -> None:
    assert not tissue_mask(np.full((256, 256, 3), 255, np.uint8)).any()
    # slightly noisy grey glass: Otsu alone would split the noise, the saturation floor keeps it empty
    rng = np.random.default_rng(0)
    glass = np.clip(235 + rng.normal(0, 3, (256, 256, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(glass).any()
    # control: the same glass with a threshold as low as Otsu's (5 of 255 here) is mostly "tissue"
    assert tissue_mask(glass, threshold=5).mean() > 0.5


def test_tissue_mask_finds_a_stained_disk() -> None:
    img = np.full((256, 256, 3), 245, np.uint8)
    yy, xx = np.mgrid[:256, :256]
    disk = (yy - 120) ** 2 + (xx - 140) ** 2 < 50**2
    img[disk] = (200, 90, 170)  # eosin/haematoxylin-like pink-purple
    mask = tissue_mask(img)
    iou = (mask & disk).sum() / (mask | disk).sum()
    assert iou > 0.95
