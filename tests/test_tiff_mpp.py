"""A plain TIFF's pixel size does not depend on which backend its size selects: its resolution tags are read
the same way by the in-memory image backend (small files) and by tiffslide (large or tiled files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from histoseg.io import open_slide


def _tiff(path: Path, mpp: float | None, unit: str = "CENTIMETER", tile: tuple[int, int] | None = None) -> Path:
    img = np.full((256, 320, 3), 200, np.uint8)
    kw: dict[str, object] = {"photometric": "rgb"}
    if mpp is not None:
        per_unit = (1e4 if unit == "CENTIMETER" else 25400.0) / mpp
        kw.update(resolution=(per_unit, per_unit), resolutionunit=unit)
    if tile:
        kw["tile"] = tile
    tifffile.imwrite(path, img, **kw)  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize(("mpp", "unit", "expected"), [
    (0.5, "CENTIMETER", 0.5),
    (0.25, "INCH", 0.25),
    (25400 / 72, "INCH", None),  # 72 dpi: an image editor's default, not a microscope's pixel
])
def test_same_mpp_from_both_backends(tmp_path: Path, mpp: float, unit: str, expected: float | None) -> None:
    plain = _tiff(tmp_path / "plain.tif", mpp, unit)
    tiled = _tiff(tmp_path / "tiled.tif", mpp, unit, tile=(64, 64))
    with open_slide(plain) as a, open_slide(tiled) as b:
        assert a.meta.backend == "image" and b.meta.backend == "tiffslide"
        for reader in (a, b):
            if expected is None:
                assert reader.meta.mpp is None
            else:
                assert reader.meta.mpp == pytest.approx(expected, rel=1e-6)
                assert reader.meta.mpp_source == "metadata"


def test_untagged_plain_tiff_still_needs_slide_mpp(tmp_path: Path) -> None:
    with open_slide(_tiff(tmp_path / "bare.tif", None)) as r:
        assert r.meta.mpp is None
    with open_slide(_tiff(tmp_path / "bare2.tif", None), mpp=0.4) as r:
        assert r.meta.mpp == 0.4 and r.meta.mpp_source == "user"
