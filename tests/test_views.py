"""``--views``: the network's maps averaged over mirrored and transposed views (inference.views)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from histoseg.cli.main import main
from histoseg.config import SegmentConfig
from histoseg.errors import ConfigError
from histoseg.inference import NetworkPredictor
from histoseg.inference.views import run_views
from histoseg.models import resolve_model
from histoseg.models.typemap import TypeMap

from .conftest import make_demo_slide


def _equivariant(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, TypeMap]:
    """A stand-in network that is exactly equivariant to mirrors and transposes: NP is the red channel, HV its
    x and y central differences (a mirror negates one, a transpose swaps them), types two channels on a stride-4
    grid as the context type head gives them (each cell the mean of its 4 x 4 pixels)."""
    r = image[..., 0].astype(np.float32) / 255
    hv = np.stack([np.gradient(r, axis=1), np.gradient(r, axis=0)]).astype(np.float32)
    tp = np.stack([r, 1 - r]).astype(np.float32)
    h, w = r.shape
    cells = tp.reshape(2, h // 4, 4, w // 4, 4).mean(axis=(2, 4), dtype=np.float64).astype(np.float32)
    return r, hv, TypeMap(cells, 4)


def _skewed(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
    """Not equivariant: NP = red + the column index / 100 (a left-to-right ramp), HV zero."""
    r = image[..., 0].astype(np.float32) / 255
    ramp = np.arange(image.shape[1], dtype=np.float32)[None, :] / 100
    return r + ramp, np.zeros((2, *r.shape), np.float32), None


def test_views_bring_every_map_back_to_the_image_frame() -> None:
    """For an exactly equivariant network every view gives the same maps once brought back, so the mean of 4 or
    8 views equals one pass: a wrong sign or a swapped HV channel would show here."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)  # sides on the stride: no padding
    one = _equivariant(image)
    for views in (4, 8):
        got = run_views(_equivariant, image, views)
        assert got[2] is not None and got[2].stride == 4 and got[2].prob.shape == (2, 8, 12)
        for a, b in zip((*got[:2], got[2].prob), (*one[:2], one[2].prob), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    odd = image[:30, :45]  # sides off the type grid: the cells that cover them, ceil(30 / 4) x ceil(45 / 4)
    for views in (4, 8):
        got = run_views(_equivariant, odd, views)
        assert got[0].shape == (30, 45) and got[2] is not None and got[2].prob.shape == (2, 8, 12)


def test_views_average_what_is_not_equivariant_and_keep_the_shape() -> None:
    """A left-to-right ramp (column j: j / 100) mirrored left-right and back is the reversed ramp, so the 4-view
    mean of a 40-px-wide image is flat at (47 / 2) / 100 on the padded 48-px width; the output is cropped back to
    the input's 20 x 40 px, and type maps stay absent."""
    image = np.zeros((20, 40, 3), np.uint8)
    np_prob, hv, tp = run_views(_skewed, image, 4)
    assert np_prob.shape == (20, 40) and hv.shape == (2, 20, 40) and tp is None
    np.testing.assert_allclose(np_prob, 0.235, atol=1e-6)


def test_views_outside_the_choices_are_refused() -> None:
    with pytest.raises(ConfigError, match="views must be one of 1, 4, 8"):
        run_views(_equivariant, np.zeros((16, 16, 3), np.uint8), 2)
    with pytest.raises(ConfigError, match="--views must be one of 1, 4, 8"):
        SegmentConfig(views=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--views must be one of 1, 4, 8, got True"):
        SegmentConfig(views=True)  # type: ignore[arg-type]  # True == 1, but not a number of views
    with pytest.raises(ConfigError, match="views must be one of"):  # at construction, not in a worker
        NetworkPredictor(resolve_model("default"), views=2)  # type: ignore[arg-type]
    assert "views" not in SegmentConfig().output_affecting()  # old outputs keep their resume identity
    assert SegmentConfig(views=8).output_affecting()["views"] == 8


def test_eight_views_give_the_same_typed_nuclei_for_two_region_sizes(tmp_path: Path) -> None:
    """The typed model with 8 views on the demo slide at region sizes 256 and 512: the identical nucleus table
    (the input is padded to the stride before it is mirrored, so every view samples the plane's stride grid);
    provenance records the views, and the table differs from one view's."""
    slide = make_demo_slide(tmp_path / "demo.tif", 1024, 3)
    tables = {}
    for views, size in ((8, 256), (8, 512), (1, 256)):
        out = tmp_path / f"v{views}-{size}"
        args = ["segment", str(slide), "-o", str(out), "--model", "typed", "--tta", "none", "--views", str(views),
                "--region-size", str(size), "--no-report", "--formats", "parquet"]  # fmt: skip
        assert main(args) == 0
        prov = json.loads((out / "demo" / "provenance.json").read_text())
        assert prov["views"] == views
        tables[views, size] = pq.read_table(out / "demo" / "demo.nuclei.parquet")
    assert tables[8, 256].num_rows > 100
    assert tables[8, 256].equals(tables[8, 512])
    assert not tables[8, 256].equals(tables[1, 256])
