"""int8 post-training static quantisation of the ONNX export, calibrated on the slide or on MoNuSeg *training* crops.

The fp32 ONNX export (``runtime.export_onnx``, from the artifact's safetensors) is quantised with ONNX Runtime's
static quantiser. Activation ranges come from one of two sources: ``segment`` calibrates on the slide itself
(seeded tissue crops written by :mod:`histoseg.pipeline.calibrate` to a ``.calibration.npz`` file beside the
slide's outputs, so no dataset is needed and the ranges fit the slide's staining); without such a file (the
benchmarks, library use) a fixed, seeded set of crops of the MoNuSeg 2018 training images at the card's
resolution (never the test images, which score the result). The quantised graph is cached under a key of
(weights content, calibration settings and data, quantiser version): beside the fp32 export for MoNuSeg
calibration, beside the calibration file for a slide's (removed with the slide's other intermediates), so
changing any of them re-quantises and adapted weights are quantised the same way. One QDQ graph serves both
int8 engines: ONNX Runtime runs it as QLinearConv, OpenVINO reads the Q/DQ pairs as FakeQuantize and runs int8 kernels.

Settings chosen by measurement (ONNX Runtime, 14 MoNuSeg-test images, PQ of PyTorch fp32 0.5764; max |map
difference| from fp32 on a 1024² CMU-1 region): the default (QDQ, per-channel symmetric int8 weights, uint8
activations, min-max ranges, 16 crops of 256², output 1x1 convolutions in fp32) PQ 0.5760, max 0.138; all
convolutions quantised 0.5756, 0.144; per-tensor weights 0.5756, 0.213; percentile ranges 0.5777, 0.212;
QOperator format 0.5760, 0.138 (same numbers, but OpenVINO cannot read its QLinearAdd); 4 crops of 128² 0.5771,
0.176. Every variant keeps PQ within 0.002, so the map error decides; keeping the heads in fp32 costs nothing
measurable in speed (two 1x1 convolutions with 2 outputs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histoseg.atomic import atomic_file
from histoseg.errors import ConfigError, DatasetError, ModelError, OutputError
from histoseg.models import ModelArtifact, ModelCard
from histoseg.models.inputs import input_array, to_input

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
FORMATS = ("qdq", "qoperator")


@dataclass(frozen=True)
class CalibrationSettings:
    """Everything that changes the quantised graph besides the weights (all part of its cache key).

    ``crops`` crops of ``size``² pixels, drawn with ``seed`` from the MoNuSeg training images at the card's mpp;
    ``keep_output_convs``: leave the last convolution before each output (the 1x1 heads) in fp32;
    ``reduce_range``: 7-bit weights, so that int8 kernels without VNNI do not saturate (None: decided by this
    CPU, :func:`~histoseg.inference.precision.cpu_int8_saturates`; part of the key, so a cache shared by
    machines of both kinds keeps one graph each)."""

    crops: int = 16
    size: int = 256
    seed: int = 0
    method: str = "minmax"
    per_channel: bool = True
    fmt: str = "qdq"
    keep_output_convs: bool = True
    reduce_range: bool | None = None

    def __post_init__(self) -> None:
        if self.reduce_range is None:
            from histoseg.inference.precision import cpu_int8_saturates

            object.__setattr__(self, "reduce_range", cpu_int8_saturates()[0])
        if self.method not in CALIBRATION_METHODS:
            raise ConfigError(
                f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {self.method!r}"
            )
        if self.fmt not in FORMATS:
            raise ConfigError(f"quantisation format must be one of {', '.join(FORMATS)}, got {self.fmt!r}")
        if self.crops < 1 or self.size < 32:
            raise ConfigError(f"calibration needs at least 1 crop of at least 32 px, got {self.crops} of {self.size}")

    def key(self, data_tag: str | None = None) -> str:
        """A short digest of everything besides the weights that shapes the int8 graph: these settings, the
        quantiser options fixed in this module (``QUANTISER_VERSION``), ONNX Runtime's and PyTorch's versions
        (the quantiser and the fp32 export it starts from) and the calibration data: ``data_tag`` (a slide's
        crops, :func:`calibration_tag`), else the MoNuSeg training images found (``calibration_data_tag``), so
        a partial or changed MoNuSeg copy never reuses another's graph. The versions are read from the installed
        packages' metadata: a worker that finds the graph never imports torch (~190 MB a process)."""
        from importlib.metadata import version

        blob = json.dumps(
            {
                **asdict(self),
                "ort": version("onnxruntime"),
                "torch": version("torch"),
                "quantiser": QUANTISER_VERSION,
                "data": calibration_data_tag() if data_tag is None else data_tag,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


QUANTISER_VERSION = 1
"""Bump when the options passed to the quantiser in ``quantize_onnx`` change (types, symmetry, exclusions)."""


def calibration_data_tag(root: Path | None = None) -> str:
    """Digest of the MoNuSeg training images' names and sizes (what calibration reads); DatasetError if absent.

    Cheap (a directory listing), so ``--runtime ...-int8`` can check its calibration data before any slide runs."""
    from histoseg.datasets.common import dataset_root, require_dir

    folder = require_dir(dataset_root(root, "monuseg2018") / "MoNuSegTrainingData" / "Tissue_Images")
    files = sorted((f.name, f.stat().st_size) for f in folder.glob("*.jpg"))
    if not files:
        raise DatasetError(f"no MoNuSeg training images in {folder} (int8 calibration needs them)")
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:12]


def int8_path(onnx_dir: Path, content_key: str, settings: CalibrationSettings, data_tag: str | None = None) -> Path:
    """Where the quantised graph of weights ``content_key`` under ``settings`` (and calibration data ``data_tag``,
    ``None``: MoNuSeg's) is cached."""
    return onnx_dir / f"{content_key}-int8-{settings.key(data_tag)}.onnx"


SLIDE_SETTINGS = CalibrationSettings(reduce_range=True)
"""A slide's calibration: 7-bit weights on every CPU, not only where 8-bit ones saturate (x86 without VNNI). The
client and every node of a cluster then build the same graph whatever their CPUs, and its integer arithmetic
is exact on all of them. Measured with it on an AVX2-only AMD EPYC: MoNuSeg-test PQ 0.5762 (OpenVINO) / 0.5774
(ONNX Runtime) against 0.5764 in fp32; DSB (30) 0.3224 against 0.3242 (OpenVINO)."""

CALIBRATION_SUFFIX = ".calibration.npz"
"""A slide's calibration crops beside its outputs (``<stem>.calibration.npz``, an intermediate)."""


def write_calibration(crops: Sequence[np.ndarray], path: Path) -> Path:
    """Save calibration crops (RGB uint8 at the card's mpp, in their order) atomically as ``path`` (.npz)."""
    if not crops:
        raise ConfigError("int8 calibration needs at least one crop")
    arrays = {f"crop_{i:03d}": np.ascontiguousarray(c[..., :3], dtype=np.uint8) for i, c in enumerate(crops)}
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    return path


def _read_calibration(path: Path) -> list[np.ndarray]:
    try:
        with np.load(path) as z:
            crops = [z[name] for name in sorted(z.files)]
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read the int8 calibration crops {path}: {exc}") from exc
    if not crops or any(c.ndim != 3 or c.shape[2] != 3 or c.dtype != np.uint8 for c in crops):
        raise DatasetError(f"{path} holds no RGB uint8 calibration crops")
    return crops


def calibration_tag(path: Path) -> str:
    """Digest of the crops in a calibration file (their shapes and pixels, not the file's bytes: a zip records
    the time it was written, and the same slide must give the same key on a rerun)."""
    h = hashlib.sha256()
    for c in _read_calibration(path):
        h.update(repr(c.shape).encode())
        h.update(c.tobytes())
    return h.hexdigest()[:12]


def calibration_crops(card: ModelCard, settings: CalibrationSettings, root: Path | None = None) -> list[np.ndarray]:
    """The network inputs (1, 3, size, size) float32 the activation ranges are measured on.

    MoNuSeg 2018 *training* images at the card's mpp; image and position of each crop drawn with ``seed``, the
    images cycled so every crop comes from a different image while there are enough of them."""
    from histoseg.datasets.monuseg import load_monuseg

    samples = load_monuseg("train", card.mpp, root)
    rng = np.random.default_rng(settings.seed)
    order = rng.permutation(len(samples))
    out = []
    for i in range(settings.crops):
        image = samples[int(order[i % len(order)])].image
        h, w = image.shape[:2]
        if h < settings.size or w < settings.size:
            raise DatasetError(
                f"MoNuSeg training image {h}x{w} is smaller than the {settings.size} px calibration crop"
            )
        y, x = int(rng.integers(0, h - settings.size + 1)), int(rng.integers(0, w - settings.size + 1))
        crop = np.ascontiguousarray(image[y : y + settings.size, x : x + settings.size])
        out.append(to_input(crop, card).numpy())
    return out


def _output_convs(graph: Any) -> list[str]:
    """Names of the Conv nodes that produce the graph's outputs, following data inputs back through the
    element-wise and resampling ops between them (tanh, resize, slice), whatever the head layout."""
    producer = {out: node for node in graph.node for out in node.output}
    found = []
    for output in graph.output:
        node = producer.get(output.name)
        while node is not None and node.op_type != "Conv":
            node = producer.get(node.input[0]) if node.input else None
        if node is not None and node.name not in found:
            found.append(node.name)
    return found


def _reader(inputs: list[np.ndarray]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        """Feeds the calibration inputs one by one to the quantiser."""

        def __init__(self) -> None:
            self._it: Iterator[np.ndarray] = iter(inputs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {"x": x}

        def rewind(self) -> None:
            self._it = iter(inputs)

    return Reader()


def quantize_onnx(
    fp32: Path,
    artifact: ModelArtifact,
    content_key: str,
    settings: CalibrationSettings | None = None,
    calibration: Path | None = None,
) -> Path:
    """The int8 graph of the fp32 export ``fp32``, calibrated per ``settings`` and cached: on the crops of
    ``calibration`` (a slide's, :func:`write_calibration`) and beside that file, or on MoNuSeg training crops
    and beside the export."""
    settings = settings or (CalibrationSettings() if calibration is None else SLIDE_SETTINGS)
    tag = None if calibration is None else calibration_tag(calibration)
    target = int8_path(fp32.parent if calibration is None else calibration.parent, content_key, settings, tag)
    if target.exists():
        return target
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    card = artifact.card()
    if calibration is None:
        inputs = calibration_crops(card, settings)
    else:
        inputs = [np.ascontiguousarray(input_array(c, card)) for c in _read_calibration(calibration)]
    exclude = _output_convs(onnx.load(str(fp32)).graph) if settings.keep_output_convs else []
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    root = logging.getLogger()
    root.addFilter(_no_preprocess_advice)
    try:  # atomic: concurrent quantisers write the same bytes, the last rename wins (see runtime.export_onnx)
        # the quantiser writes and deletes "<input>-inferred.onnx" beside its input: it reads a private copy of the
        # shared fp32 export, or two slides quantised at once (a batch, parallel jobs) break each other's file
        with atomic_file(target) as tmp, tempfile.TemporaryDirectory(prefix="histoseg-quantise-") as work:
            source = Path(work) / "fp32.onnx"
            shutil.copyfile(fp32, source)
            quantize_static(
                str(source),
                str(tmp),
                _reader(inputs),
                quant_format=QuantFormat.QDQ if settings.fmt == "qdq" else QuantFormat.QOperator,
                per_channel=settings.per_channel,
                reduce_range=bool(settings.reduce_range),
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=methods[settings.method],
                nodes_to_exclude=exclude,
                extra_options={"WeightSymmetric": True},
                calibration_providers=["CPUExecutionProvider"],
            )
    except (DatasetError, ConfigError, OutputError):
        raise
    except Exception as exc:
        raise ModelError(f"could not quantise {artifact.weights.name} to int8: {exc}") from exc
    finally:
        root.removeFilter(_no_preprocess_advice)
    return target


def _no_preprocess_advice(record: logging.LogRecord) -> bool:
    """Drop the quantiser's advice to run its shape pre-processing: the export is already folded (BatchNorm
    into Conv) and shape-inferred, and the advice would print on every first run."""
    return "pre-process" not in record.getMessage()
