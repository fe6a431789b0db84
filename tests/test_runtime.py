"""Network engines: OpenVINO / ONNX Runtime give PyTorch's maps (to float rounding) from an ONNX export of
the safetensors, cached by content; a missing engine is a clear error; provenance records the engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from histoseg.config import SegmentConfig
from histoseg.errors import ConfigError
from histoseg.inference import NetworkPredictor
from histoseg.inference import runtime as rt
from histoseg.models import resolve_model

ENGINES = [pytest.param(name, marks=pytest.mark.skipif(not rt.available(name), reason=f"{name} not installed"))
           for name in ("openvino", "onnxruntime")]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(rt.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_matches_torch_on_real_tissue(engine: str, cache: Path, shared_data: Path) -> None:
    from histoseg.io import open_slide
    from histoseg.types import Box

    with open_slide(shared_data / "slides" / "aperio-cmu1-small" / "CMU-1-Small-Region.svs") as reader:
        image = reader.read_plane(Box(300, 500, 200, 232), 0.5)  # not a stride multiple: padding path too
    art = resolve_model("default")
    ref = NetworkPredictor(art).predict(image)
    got = NetworkPredictor(art, runtime=engine).predict(image)
    assert got[0].shape == ref[0].shape == image.shape[:2] and got[1].shape == ref[1].shape
    np.testing.assert_allclose(got[0], ref[0], atol=1e-4)
    np.testing.assert_allclose(got[1], ref[1], atol=1e-4)
    exported = list((cache / "onnx").glob("*.onnx"))
    assert len(exported) == 1  # exported once, named by content
    NetworkPredictor(art, runtime=engine).predict(image[:64, :64])
    assert list((cache / "onnx").glob("*.onnx")) == exported  # reused, no second export


def test_default_is_torch_and_unknown_or_missing_engines_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    assert SegmentConfig().runtime == "torch"
    assert rt.resolve_runtime("torch").runtime == "torch"
    with pytest.raises(ConfigError, match="--runtime"):
        SegmentConfig(runtime="tensorrt")
    with pytest.raises(ConfigError, match="CPU only"):
        rt.resolve_runtime("openvino", "cuda")
    monkeypatch.setattr(rt, "available", lambda name: name == "torch")
    with pytest.raises(ConfigError, match="not installed"):
        rt.resolve_runtime("onnxruntime")


@pytest.mark.parametrize("engine", ENGINES)
def test_provenance_records_the_engine(engine: str, cache: Path, tmp_path: Path) -> None:
    import cv2

    from histoseg.cli.main import main

    img = np.full((256, 256, 3), 235, np.uint8)
    rng = np.random.default_rng(0)
    for _ in range(25):  # dark purple blobs on pink: some tissue, some nuclei
        y, x = rng.integers(20, 236, 2)
        cv2.circle(img, (int(x), int(y)), 6, (90, 40, 120), -1)
    img[img[..., 0] == 235] = (230, 170, 200)
    png = tmp_path / "blobs.png"
    cv2.imwrite(str(png), img[..., ::-1])
    rc = main(["segment", str(png), "-o", str(tmp_path / "out"), "--slide-mpp", "0.5", "--tta", "none",
               "--runtime", engine, "--no-report", "--formats", "parquet"])
    assert rc == 0
    record = json.loads((tmp_path / "out" / "blobs" / "provenance.json").read_text())
    assert record["runtime"]["runtime"] == engine
