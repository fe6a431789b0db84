"""Dense prediction: an RGB array in, NP probability / HV maps / TP probabilities out.

``NetworkPredictor`` is what region tasks receive: it holds only the artifact path and device, so it
pickles cheaply to any worker, and loads the network lazily once per process. This module does not import
torch: a worker running an exported engine (OpenVINO, ONNX Runtime) never loads it (~190 MB a process);
the PyTorch engine lives in ``inference.eager``.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from histoseg.config import Views, check_views
from histoseg.inference.runtime import GRAPH_VERSION, Engine, compile_engine, engine_graph, math_threads
from histoseg.inference.views import Maps, run_views
from histoseg.models import ModelArtifact, ModelCard, load_model
from histoseg.models.inputs import input_array, pad_to_stride
from histoseg.models.typemap import TypeMap
from histoseg.types import Region

CACHE_SIZE = 3  # models kept per process: a batch adapts a new model per slide, the cache must not grow with it
_LOCK = threading.Lock()


class DensePredictor(Protocol):
    """Anything that turns an RGB region into dense maps at the card's mpp."""

    def card(self) -> ModelCard: ...

    def predict(self, image: np.ndarray, region: Region | None = None) -> Maps:
        """Dense maps of ``image``; ``region`` (where the image lies in the plane) is optional context."""
        ...


_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}


def _content_key(artifact: ModelArtifact) -> str:
    """SHA-256 of the weights and card bytes and the export's ``GRAPH_VERSION``, memoised on their (path, size,
    mtime).

    The model cache is keyed by content, not path: a long-lived worker must never serve old weights after a
    new artifact (e.g. a slide's adapted weights on a rerun) was written to the same path."""
    try:
        ws, cs = artifact.weights.stat(), artifact.card_path.stat()
    except OSError:
        return f"missing:{artifact.weights}"  # load_model raises the clear error
    stamp = (str(artifact.weights), ws.st_size, ws.st_mtime_ns, cs.st_size, cs.st_mtime_ns)
    digest = _DIGESTS.get(stamp)
    if digest is None:
        h = hashlib.sha256(artifact.sha256().encode())
        h.update(artifact.card_path.read_bytes())
        h.update(f"graph {GRAPH_VERSION}".encode())
        digest = _DIGESTS[stamp] = h.hexdigest()
    return digest


_ENGINES: OrderedDict[tuple[str, str, bool, int, str], tuple[Engine, ModelCard]] = OrderedDict()


def _calibration_stamp(calibration: str | None) -> str:
    """The calibration file as part of an engine's cache key (path, size, mtime: a rewritten file recompiles)."""
    if calibration is None:
        return ""
    try:
        st = Path(calibration).stat()
    except OSError:
        return f"missing:{calibration}"  # the quantiser raises the clear error
    return f"{calibration}:{st.st_size}:{st.st_mtime_ns}"


def _cached_engine(
    artifact: ModelArtifact, runtime: str, bf16: bool, calibration: str | None = None
) -> tuple[Engine, ModelCard]:
    """A compiled engine per (content, runtime, precision, threads, calibration), LRU-bounded like the PyTorch
    models."""
    threads = math_threads()
    content = _content_key(artifact)
    key = (content, runtime, bf16, threads, _calibration_stamp(calibration))
    with _LOCK:
        if key in _ENGINES:
            _ENGINES.move_to_end(key)
        else:
            engine = compile_engine(artifact, content, runtime, bf16, threads, calibration)
            _ENGINES[key] = (engine, artifact.card())
            while len(_ENGINES) > CACHE_SIZE:
                _ENGINES.popitem(last=False)
        return _ENGINES[key]


_CARDS: dict[str, ModelCard] = {}


def _cached_card(key: str, artifact: ModelArtifact) -> ModelCard:
    with _LOCK:
        if key not in _CARDS:
            _CARDS[key] = artifact.card()
        return _CARDS[key]


@dataclass(frozen=True)
class NetworkPredictor:
    """Runs the trained network; ``bf16`` autocast (decided by ``inference.precision``: only where the device
    computes it natively) halves the time there at a negligible accuracy cost."""

    artifact: ModelArtifact
    device: str = "cpu"
    bf16: bool = False
    runtime: str = "torch"  # torch | openvino | onnxruntime (resolved by ``inference.runtime``)
    views: Views = 1  # maps averaged over this many flipped/transposed views (``inference.views``)
    calibration: str | None = None  # -int8 runtimes: the slide's calibration crops (``pipeline.calibrate``)

    def __post_init__(self) -> None:
        check_views(self.views, "views")  # here, not in a worker on every region

    def check(self) -> None:
        """Load the weights once on the CPU (ModelError when they are unreadable or do not fit the card), so a
        bad model fails a batch up front instead of every slide in its workers."""
        load_model(self.artifact, "cpu")

    def prepare(self) -> None:
        """Write the exported engine's graph here, before region tasks go out: a worker that finds it never
        imports torch (~190 MB a worker process). A no-op for the PyTorch engine."""
        if self.runtime != "torch":
            engine_graph(self.artifact, _content_key(self.artifact), self.runtime, self.calibration)

    def with_artifact(self, artifact: ModelArtifact) -> NetworkPredictor:
        """The same predictor (device, precision, runtime, calibration) over other weights, e.g. a slide's adapted
        ones."""
        return replace(self, artifact=artifact)

    def card(self) -> ModelCard:
        """The card alone (no weights are loaded, nothing is moved to the device: planning a slide on a
        submit host without a GPU must work)."""
        return _cached_card(_content_key(self.artifact), self.artifact)

    def predict(self, image: np.ndarray, region: Region | None = None) -> Maps:
        if self.runtime != "torch":
            engine, card = _cached_engine(self.artifact, self.runtime, self.bf16, self.calibration)
            return run_engine(engine, card, image, self.views)
        from histoseg.inference.eager import cached_model, run_network  # torch: only on this path

        net, card = cached_model(_content_key(self.artifact), self.artifact, self.device)
        return run_network(net, card, image, device=self.device, bf16=self.bf16, views=self.views)


def _softmax0(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 of (C, H, W) logits, float32."""
    z = logits - logits.max(axis=0, keepdims=True)
    e = np.exp(z, dtype=np.float32)
    return e / e.sum(axis=0, keepdims=True)  # type: ignore[no-any-return]


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    """Per-class probabilities of the type head (independent sigmoids), float32, contiguous: ``1 / (1 + exp(-x))``
    computed in place in one float32 copy of ``logits``, not a temporary per operation."""
    x = np.array(logits, dtype=np.float32, order="C")
    np.clip(x, -60.0, 60.0, out=x)
    np.negative(x, out=x)
    np.exp(x, out=x)
    x += np.float32(1.0)
    np.reciprocal(x, out=x)
    return x


def run_engine(engine: Engine, card: ModelCard, image: np.ndarray, views: int = 1) -> Maps:
    """``run_network`` through a compiled engine (OpenVINO, ONNX Runtime): same padding, inputs, outputs and
    view averaging."""
    return run_views(lambda im: _run_engine_once(engine, card, im), image, views)


def _run_engine_once(engine: Engine, card: ModelCard, image: np.ndarray) -> Maps:
    h, w = image.shape[:2]
    out = engine(input_array(pad_to_stride(image), card))
    np_prob = _softmax0(out["np"][0].astype(np.float32))[1, :h, :w]
    hv = out["hv"][0, :, :h, :w]  # the network applies tanh itself
    tp = None
    if "tp" in out:  # on the type head's grid (models.typemap): 1/16 of a full-resolution map at stride 4
        cells = TypeMap(out["tp"][0], card.net.type_stride).crop(h, w)
        tp = TypeMap(_sigmoid(cells.prob), cells.stride)
    return np.ascontiguousarray(np_prob), np.ascontiguousarray(hv, dtype=np.float32), tp
