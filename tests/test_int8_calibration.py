"""int8 engines calibrated on the slide itself: ``segment --runtime ...-int8`` needs no dataset, records the
calibration, gives the same nuclei whatever the workers and region size, and leaves nothing behind; the
calibration file keys the int8 graph by its crops, not by its bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from histoseg.cli.main import main
from histoseg.errors import DatasetError
from histoseg.inference import NetworkPredictor
from histoseg.inference import quantize as q
from histoseg.inference import runtime as rt
from histoseg.models import resolve_model

from .conftest import DSB_ADAPTS, dsb_image_that_adapts

INT8 = [
    pytest.param(name, marks=pytest.mark.skipif(not rt.available(name), reason=f"{name} not installed"))
    for name in ("openvino-int8", "onnxruntime-int8")
]


def test_calibration_file_is_keyed_by_its_crops(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    a = q.write_calibration(crops, tmp_path / "a.calibration.npz")
    b = q.write_calibration(crops, tmp_path / "b.calibration.npz")  # written later: another zip timestamp
    assert q.calibration_tag(a) == q.calibration_tag(b)
    other = q.write_calibration([crops[0], crops[2], crops[1]], tmp_path / "c.calibration.npz")  # order matters
    assert q.calibration_tag(other) != q.calibration_tag(a)
    settings = q.CalibrationSettings()
    assert q.int8_path(tmp_path, "w", settings, q.calibration_tag(a)) != q.int8_path(
        tmp_path, "w", settings, q.calibration_tag(other)
    )
    bad = tmp_path / "bad.calibration.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="calibration crops"):
        q.calibration_tag(bad)
    with pytest.raises(Exception, match="at least one crop"):
        q.write_calibration([], tmp_path / "empty.npz")


@pytest.mark.skipif(not rt.available("onnxruntime-int8"), reason="onnxruntime not installed")
def test_without_a_slide_int8_calibrates_on_monuseg_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runtime is accepted without any dataset (``segment`` calibrates on the slide); a predictor given no
    calibration file (library use, the benchmarks) needs the MoNuSeg training images and names them. The
    in-process engine cache starts empty: an engine compiled by an earlier test would skip the calibration."""
    from collections import OrderedDict

    from histoseg.inference import predict

    monkeypatch.setattr(predict, "_ENGINES", OrderedDict())
    monkeypatch.setenv("HISTOSEG_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setenv(rt.CACHE_ENV, str(tmp_path / "cache"))
    assert rt.resolve_runtime("onnxruntime-int8").runtime == "onnxruntime-int8"
    with pytest.raises(DatasetError, match="MoNuSeg|monuseg"):
        NetworkPredictor(resolve_model("default"), runtime="onnxruntime-int8").predict(
            np.full((64, 64, 3), 200, np.uint8)
        )


@pytest.mark.parametrize("engine", INT8)
def test_int8_segment_calibrates_on_the_slide(
    engine: str, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real image from another lab, adapted by default, then run by an int8 engine calibrated on its own tissue
    with no dataset reachable: the provenance records the calibration, the nuclei are the same for one or two
    workers and two region sizes, and the calibration crops and the int8 graph stay beside the slide's outputs
    (nothing in the shared cache) and go after ``_SUCCESS`` unless ``--keep-adapted``."""
    image = dsb_image_that_adapts(shared_data)
    monkeypatch.setenv("HISTOSEG_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setenv(rt.CACHE_ENV, str(tmp_path / "cache"))
    tables = []
    for w, size, keep in ((1, 256, True), (2, 256, False), (1, 128, False)):
        out = tmp_path / f"w{w}-{size}"
        args = ["segment", str(image), "-o", str(out), "--slide-mpp", "0.5", "--workers", str(w), "--runtime",
                engine, "--region-size", str(size), "--formats", "parquet", "--no-report"]  # fmt: skip
        assert main(args + (["--keep-adapted"] if keep else [])) == 0
        folder = out / DSB_ADAPTS
        record = json.loads((folder / "provenance.json").read_text())
        assert record["runtime"]["runtime"] == engine
        cal = record["int8_calibration"]
        assert cal["source"] == "slide" and cal["crops"] >= 1 and cal["crop_px"] == 256
        assert record["adaptation"]["method"] == "g2p" and record["adaptation"]["kept_source"] is False
        npz = folder / f"{DSB_ADAPTS}{q.CALIBRATION_SUFFIX}"
        graphs = sorted(folder.glob("*-int8-*.onnx"))
        if keep:  # the crops and the graph calibrated on them (of the adapted weights), beside the outputs
            assert npz.exists() and q.calibration_tag(npz) == cal["crops_digest"] and len(graphs) == 1
        else:
            assert not npz.exists() and not graphs and not list(folder.glob("*.onnx"))
        assert not list((tmp_path / "cache").rglob("*-int8-*.onnx"))
        tables.append(pq.read_table(folder / f"{DSB_ADAPTS}.nuclei.parquet"))
    t0, *rest = tables
    assert t0.num_rows > 20
    for t in rest:
        assert t.equals(t0)


@pytest.mark.skipif(not rt.available("onnxruntime-int8"), reason="onnxruntime not installed")
def test_regions_table_calibrates_like_segment(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run_regions_table`` (no outputs) calibrates an int8 engine on the slide as ``segment`` does, without any
    dataset, and finds the same nuclei (centroids) as ``segment`` with the same settings."""
    from histoseg.config import SegmentConfig
    from histoseg.distributed import InProcessRunner
    from histoseg.pipeline.slide import run_regions_table

    image = dsb_image_that_adapts(shared_data)
    monkeypatch.setenv("HISTOSEG_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setenv(rt.CACHE_ENV, str(tmp_path / "cache"))
    cfg = SegmentConfig(slide_mpp=0.5, runtime="onnxruntime-int8", tta="none", region_size=128)
    table = run_regions_table(image, cfg, InProcessRunner())
    out = tmp_path / "out"
    args = ["segment", str(image), "-o", str(out), "--slide-mpp", "0.5", "--runtime", "onnxruntime-int8", "--tta",
            "none", "--region-size", "128", "--formats", "parquet", "--no-report"]  # fmt: skip
    assert main(args) == 0
    seg = pq.read_table(out / DSB_ADAPTS / f"{DSB_ADAPTS}.nuclei.parquet").to_pydict()
    assert len(table.centroids) == len(seg["centroid_x"]) > 20
    assert sorted(map(tuple, np.round(table.centroids, 6))) == sorted(
        zip(np.round(seg["centroid_x"], 6), np.round(seg["centroid_y"], 6), strict=True)
    )


@pytest.mark.skipif(not rt.available("onnxruntime-int8"), reason="onnxruntime not installed")
def test_two_slides_quantise_the_shared_export_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two slides calibrated differently quantise the same cached fp32 export at the same time (a batch, parallel
    jobs): ONNX Runtime's quantiser writes and deletes a file beside its input, so each reads a private copy; both
    graphs are built and nothing is left beside the shared export."""
    from concurrent.futures import ThreadPoolExecutor

    from histoseg.inference.predict import _content_key

    monkeypatch.setenv(rt.CACHE_ENV, str(tmp_path / "cache"))
    art = resolve_model("default")
    key = _content_key(art)
    fp32 = rt.export_onnx(art, key)
    rng = np.random.default_rng(0)
    files = []
    for i in range(2):
        (tmp_path / f"s{i}").mkdir()
        crops = [rng.integers(60, 250, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
        files.append(q.write_calibration(crops, tmp_path / f"s{i}" / f"s{i}{q.CALIBRATION_SUFFIX}"))
    with ThreadPoolExecutor(2) as pool:
        graphs = list(pool.map(lambda f: q.quantize_onnx(fp32, art, key, calibration=f), files))
    assert all(g.exists() and g.parent == f.parent for g, f in zip(graphs, files, strict=True))
    assert sorted(p.name for p in fp32.parent.iterdir()) == [fp32.name]
