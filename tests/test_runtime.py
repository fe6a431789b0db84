"""Network engines: OpenVINO / ONNX Runtime give PyTorch's maps (to float rounding) from an ONNX export of
the safetensors, cached by content; their int8 variants stay close to fp32 with a graph cached by (weights,
calibration settings); a missing engine is a clear error; provenance records the engine."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from histoseg.config import SegmentConfig
from histoseg.errors import ConfigError
from histoseg.inference import NetworkPredictor
from histoseg.inference import quantize as q
from histoseg.inference import runtime as rt
from histoseg.models import resolve_model

ENGINES = [
    pytest.param(name, marks=pytest.mark.skipif(not rt.available(name), reason=f"{name} not installed"))
    for name in ("openvino", "onnxruntime")
]
INT8 = [
    pytest.param(name, marks=pytest.mark.skipif(not rt.available(name), reason=f"{name} not installed"))
    for name in ("onnxruntime-int8", "openvino-int8")  # the first pays the calibration
]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty on-disk cache, and an empty in-process engine cache (earlier tests compiled the default engine
    in this process, which would skip the export these tests look for)."""
    from collections import OrderedDict

    from histoseg.inference import predict

    monkeypatch.setenv(rt.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(predict, "_ENGINES", OrderedDict())
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
    assert got[2] is not None and ref[2] is not None  # the default is typed: its map on the head's grid
    assert got[2].stride == ref[2].stride == 4 and got[2].prob.shape == ref[2].prob.shape == (4, 58, 50)
    np.testing.assert_allclose(got[2].prob, ref[2].prob, atol=1e-4)
    exported = list((cache / "onnx").glob("*.onnx"))
    assert len(exported) == 1  # exported once, named by content
    NetworkPredictor(art, runtime=engine).predict(image[:64, :64])
    assert list((cache / "onnx").glob("*.onnx")) == exported  # reused, no second export


def test_default_is_openvino_on_the_cpu_and_torch_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--runtime auto`` (the default): OpenVINO on a CPU where it is installed, PyTorch on a GPU or without
    it, each with its reason; unknown or missing engines are clear errors."""
    assert SegmentConfig().runtime == "auto"
    assert rt.resolve_runtime("torch").runtime == "torch"
    cpu = rt.resolve_runtime("auto", "cpu")
    expected = ("openvino-int8" if rt.auto_int8()[0] else "openvino") if rt.available("openvino") else "torch"
    assert (cpu.runtime, cpu.requested) == (expected, "auto")
    gpu = rt.resolve_runtime("auto", "cuda:0")
    assert gpu.runtime == "torch" and "GPU" in gpu.reason
    with pytest.raises(ConfigError, match="--runtime"):
        SegmentConfig(runtime="tensorrt")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="CPU only"):
        rt.resolve_runtime("openvino", "cuda")
    monkeypatch.setattr(rt, "available", lambda name: name == "torch")
    fallback = rt.resolve_runtime("auto")
    assert fallback.runtime == "torch" and "not installed" in fallback.reason
    with pytest.raises(ConfigError, match="not installed"):
        rt.resolve_runtime("onnxruntime")


def test_engine_choices_are_the_runtimes_without_auto() -> None:
    """``auto`` picks an engine and is not one: the engine list (which ``benchmarks/runtimes.py`` runs, one row
    each) holds every other ``--runtime``, and each of them has an install check (``auto`` crashed it)."""
    from benchmarks.runtimes import ENGINES as BENCHMARKED
    from histoseg.config import ENGINE_CHOICES, RUNTIME_CHOICES

    assert "auto" not in ENGINE_CHOICES
    assert set(ENGINE_CHOICES) == set(RUNTIME_CHOICES) - {"auto"}
    assert [e for e in BENCHMARKED if e != "torch-compile"] == list(ENGINE_CHOICES)
    assert all(isinstance(rt.available(e), bool) for e in ENGINE_CHOICES)


def test_auto_runs_int8_on_x86_with_its_float_operations_in_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """An x86 CPU, ``--precision auto``, the quantiser installed: OpenVINO int8, with or without native bf16 (bf16
    OpenVINO's outputs depend on the region's shape on an AMX Xeon, int8's do not). Arm keeps OpenVINO (int8
    unmeasured there), an explicit precision keeps a float engine, and a missing onnxruntime falls back to
    OpenVINO."""
    import platform

    from histoseg.inference.precision import CPU_BF16_ENV, cpu_native_bf16

    monkeypatch.setattr(rt, "available", lambda name: True)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")

    def auto(bf16: str, precision: str = "auto") -> str:
        monkeypatch.setenv(CPU_BF16_ENV, bf16)
        cpu_native_bf16.cache_clear()
        return rt.resolve_runtime("auto", "cpu", precision).runtime

    try:
        assert auto("0") == "openvino-int8"
        assert "int8" in rt.resolve_runtime("auto").reason
        assert auto("1") == "openvino-int8" and "native bf16" in rt.resolve_runtime("auto").reason
        assert auto("0", "fp32") == auto("0", "bf16") == auto("1", "bf16") == "openvino"
        assert rt.resolve_runtime("auto", "cuda:0").runtime == "torch"
        monkeypatch.setattr(platform, "machine", lambda: "aarch64")
        assert auto("0") == "openvino"
        monkeypatch.setattr(platform, "machine", lambda: "x86_64")
        monkeypatch.setattr(rt, "available", lambda name: name in ("torch", "openvino"))  # no onnxruntime
        assert auto("0") == "openvino" and "onnxruntime" in rt.resolve_runtime("auto").reason
    finally:
        monkeypatch.delenv(CPU_BF16_ENV)
        cpu_native_bf16.cache_clear()


def test_openvino_is_a_dependency_here() -> None:
    """The default engine is installed with histoseg on x86-64 and Arm (pyproject), so the suite exercises the
    default; without it the suite would silently test only the PyTorch fallback."""
    import platform

    if platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64"):
        assert rt.available("openvino")


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
    rc = main(
        [
            "segment",
            str(png),
            "-o",
            str(tmp_path / "out"),
            "--slide-mpp",
            "0.5",
            "--tta",
            "none",
            "--runtime",
            engine,
            "--no-report",
            "--formats",
            "parquet",
        ]
    )
    assert rc == 0
    record = json.loads((tmp_path / "out" / "blobs" / "provenance.json").read_text())
    assert record["runtime"]["runtime"] == engine


@pytest.fixture(scope="module")
def int8_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cache for the int8 tests: the (slow) calibration runs once, later engines reuse its graph."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("int8") / "cache"
        mp.setenv(rt.CACHE_ENV, str(path))
        yield path


@pytest.mark.parametrize("engine", INT8)
def test_int8_engine_stays_close_to_fp32_on_real_tissue(engine: str, int8_cache: Path, shared_data: Path) -> None:
    """Measured on CMU-1 crops (200x232 to 320x288) and a 1024² region: NP probability within 0.14 of fp32
    (mean 1e-3), HV within 0.09 (mean 0.011), under 0.05% of pixels change side of 0.5. The bounds leave ~1.5x."""
    from histoseg.io import open_slide
    from histoseg.types import Box

    with open_slide(shared_data / "slides" / "aperio-cmu1-small" / "CMU-1-Small-Region.svs") as reader:
        image = reader.read_plane(Box(600, 300, 320, 288), 0.5)
    art = resolve_model("default")
    ref_np, ref_hv, _ = NetworkPredictor(art).predict(image)
    got_np, got_hv, _ = NetworkPredictor(art, runtime=engine).predict(image)
    assert got_np.shape == ref_np.shape == image.shape[:2] and got_hv.shape == ref_hv.shape
    d_np, d_hv = np.abs(got_np - ref_np), np.abs(got_hv - ref_hv)
    assert max(d_np.max(), d_hv.max()) > 1e-3  # really quantised, not the fp32 graph
    assert d_np.max() < 0.2 and d_np.mean() < 0.003
    assert d_hv.max() < 0.15 and d_hv.mean() < 0.02
    assert np.mean((got_np > 0.5) != (ref_np > 0.5)) < 0.002
    graphs = sorted((int8_cache / "onnx").glob("*-int8-*.onnx"))
    assert [g.name.split("-int8-")[1] for g in graphs] == [f"{q.CalibrationSettings().key()}.onnx"]


@pytest.mark.skipif(not rt.available("onnxruntime-int8"), reason="onnxruntime not installed")
def test_int8_graph_keeps_the_output_convolutions_in_fp32(int8_cache: Path) -> None:
    """The 1x1 heads read fp32 weights; the other convolutions read dequantised int8 weights."""
    import onnx

    art = resolve_model("default")
    NetworkPredictor(art, runtime="onnxruntime-int8").predict(np.full((64, 64, 3), 200, np.uint8))
    fp32 = next(p for p in (int8_cache / "onnx").glob("*.onnx") if "-int8-" not in p.name)
    int8 = next((int8_cache / "onnx").glob("*-int8-*.onnx"))
    heads = q._output_convs(onnx.load(str(fp32)).graph)
    assert sorted(h.split("/")[2] for h in heads) == ["hv_head", "np_head", "tp_head"]  # the default is typed
    graph = onnx.load(str(int8)).graph
    producer = {out: n.op_type for n in graph.node for out in n.output}
    convs = {n.name: n for n in graph.node if n.op_type == "Conv"}
    for name, node in convs.items():
        weight_from = producer.get(node.input[1], "initializer")
        assert weight_from == ("initializer" if name in heads else "DequantizeLinear"), name
    assert len(convs) > 10


@pytest.mark.skipif(not rt.available("openvino-int8"), reason="openvino or onnxruntime not installed")
@pytest.mark.parametrize("per_shape", [False, True], ids=["dynamic", "per-shape"])
def test_openvino_int8_pixel_outputs_do_not_depend_on_the_input_shape(per_shape: bool, int8_cache: Path) -> None:
    """What ``auto`` runs on AVX2-only x86 CPUs: the same pixels, seen in inputs of three shapes, get the same
    outputs to the bit once they lie 192 px (the halo) inside every cut, so a slide's results cannot depend on
    the region size. Both compilations (one per shape, int8's default for the memory budget, and one dynamic):
    their static and dynamic kernels round some requantisations differently, so they are not compared with each
    other; random inputs, on which they were seen to differ by up to 0.12 of a logit."""
    from histoseg.inference.openvino_engine import OpenVinoEngine
    from histoseg.inference.predict import _cached_engine

    cached, _ = _cached_engine(resolve_model("default"), "openvino-int8", False)
    assert isinstance(cached, OpenVinoEngine) and cached.per_shape  # int8 compiles per shape, as fp32 does
    engine = OpenVinoEngine(cached._core, cached._model, cached._config, per_shape=per_shape, shapes_kept=4)
    x = np.random.default_rng(0).standard_normal((1, 3, 640, 640), dtype=np.float32)
    whole = engine(x)
    narrow = engine(np.ascontiguousarray(x[..., :448]))  # cut at column 448: columns < 256 are 192 px inside
    lower = engine(np.ascontiguousarray(x[..., 192:, :]))  # cut at row 192: rows >= 384 are 192 px inside
    assert engine.compilations == (3 if per_shape else 1)
    for name, out in whole.items():
        f = x.shape[2] // out.shape[2]  # 1, or the type map's stride
        np.testing.assert_array_equal(out[..., : 608 // f, : 256 // f], narrow[name][..., : 608 // f, : 256 // f])
        np.testing.assert_array_equal(out[..., 384 // f :, :], lower[name][..., 192 // f :, :])


def test_int8_cache_key_follows_weights_and_calibration_settings() -> None:
    base = q.CalibrationSettings()
    path = q.int8_path(Path("c"), "w1", base)
    assert path == q.int8_path(Path("c"), "w1", q.CalibrationSettings())  # deterministic
    assert path != q.int8_path(Path("c"), "w2", base)  # other weights (e.g. adapted ones)
    others = [
        q.CalibrationSettings(crops=8),
        q.CalibrationSettings(size=128),
        q.CalibrationSettings(seed=1),
        q.CalibrationSettings(method="percentile"),
        q.CalibrationSettings(per_channel=False),
        q.CalibrationSettings(fmt="qoperator"),
        q.CalibrationSettings(keep_output_convs=False),
        q.CalibrationSettings(reduce_range=not base.reduce_range),  # a cache shared by CPUs with and without VNNI
    ]
    keys = {q.int8_path(Path("c"), "w1", s) for s in others}
    assert len(keys) == len(others) and path not in keys
    # decided by this CPU when not given: 7-bit weights exactly where int8 kernels may saturate (x86 without VNNI)
    from histoseg.inference.precision import cpu_int8_saturates

    assert base.reduce_range is cpu_int8_saturates()[0]
    with pytest.raises(ConfigError, match="calibration method"):
        q.CalibrationSettings(method="kl")
    with pytest.raises(ConfigError, match="at least 1 crop"):
        q.CalibrationSettings(crops=0)


def test_int8_engine_without_its_quantiser_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """openvino-int8 needs ONNX Runtime too (its quantiser builds the graph): OpenVINO alone is not enough."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    for engine in ("openvino-int8", "onnxruntime-int8"):
        assert not rt.available(engine)
        with pytest.raises(ConfigError, match=f"--runtime {engine} needs .*onnxruntime.*not installed"):
            rt.resolve_runtime(engine)
    with pytest.raises(ConfigError, match="CPU only"):
        rt.resolve_runtime("onnxruntime-int8", "cuda")


@pytest.mark.skipif(not rt.available("onnxruntime-int8"), reason="onnxruntime not installed")
def test_monuseg_calibration_data_keys_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a slide's calibration file the int8 graph is calibrated on the MoNuSeg training images found: a
    different image set (here: one image fewer) gives another cache key, so no graph calibrated on other data is
    reused. (``segment`` calibrates on the slide: tests/test_int8_calibration.py.)"""
    from histoseg.inference import quantize as q
    from histoseg.inference.runtime import resolve_runtime

    images = tmp_path / "data" / "nuclei" / "monuseg2018" / "MoNuSegTrainingData" / "Tissue_Images"
    images.mkdir(parents=True)
    for i in range(3):
        (images / f"img{i}.jpg").write_bytes(b"x" * (10 + i))
    monkeypatch.setenv("HISTOSEG_DATA", str(tmp_path / "data"))
    full = q.CalibrationSettings().key()
    (images / "img2.jpg").unlink()
    assert q.CalibrationSettings().key() != full
    assert resolve_runtime("onnxruntime-int8").runtime == "onnxruntime-int8"


def test_engine_sigmoid_is_the_plain_formula_to_the_bit() -> None:
    """The in-place sigmoid of the engines' type maps equals ``1 / (1 + exp(-clip(x)))`` in float32 to the bit,
    saturated values included, and leaves its input alone."""
    from histoseg.inference.predict import _sigmoid

    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(0, 8, 100_000), [-1e4, -60.0, -0.0, 0.0, 1e-8, 60.0, 1e4]]).astype(np.float32)
    z = z.reshape(1, -1)
    before = z.copy()
    want = (1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))).astype(np.float32)
    got = _sigmoid(z)
    assert got.dtype == np.float32 and got.flags.c_contiguous and np.array_equal(got, want)
    assert np.array_equal(z, before)
