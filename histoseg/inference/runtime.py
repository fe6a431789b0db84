"""Which engine runs the network on a CPU: OpenVINO (default where installed), PyTorch eager, or ONNX Runtime, in
fp32, bf16 or int8.

``--runtime auto`` (the default) takes OpenVINO when the device is the CPU and the ``openvino`` package is
installed (a dependency of histoseg on x86-64 and Arm), PyTorch otherwise (a GPU, or a platform without the
wheel); the choice and its reason are recorded in provenance. Measured with ``python -m benchmarks.runtimes``
(one thread, 1024² real-tissue region of CMU-1) on the AMD EPYC development machine (AVX-512 with VNNI, native
bf16): in bf16, OpenVINO 1.50x PyTorch eager, MoNuSeg-test PQ 0.5761 against 0.5762; in fp32, 1.58x (PQ/AJI
0.5764/0.5876 for both; maps equal to 3e-6); OpenVINO allocates its buffers once per input shape, so it does not
fault fresh pages in for every region as PyTorch's allocations do (the system time that kept two PyTorch
workers from scaling). The issue that filed this measured 2.6x over eager in fp32 on an AVX2-only AMD EPYC.
Outputs are identical across region sizes (CMU-1-Small-Region at 256, 512 and 1024, fp32 and bf16: the same
table to the last bit), as with PyTorch. ``torch`` stays the reference engine (the golden digests pin it).

int8 (``-int8``, static quantisation, ``histoseg.inference.quantize``; ``segment`` calibrates on the slide's own
tissue, ``pipeline.calibrate``): on that VNNI CPU ONNX Runtime 2.52x and OpenVINO 2.28x eager fp32 in a loaded
run (MoNuSeg calibration), MoNuSeg-test PQ -0.0004 / +0.0016 (the issue allows -0.005). On an AVX2-only AMD EPYC
(7-bit weights): OpenVINO int8 1.42x OpenVINO fp32 on the network alone, MoNuSeg-test PQ 0.5762 against 0.5764
and DSB (30) 0.3224 against 0.3242 with each image calibrated on itself, and 1.57x end to end with two workers on
a 10000² real-tissue slide (0.305 against 0.194 MP/s); on a first-generation EPYC (Zen 1, family 23 model 1) only
1.0-1.1x fp32 on the network alone, at the same PQ. So ``auto`` runs **OpenVINO int8** on an x86-64 CPU
without native bf16 (where fp32 would run otherwise) when the quantiser (``onnxruntime``) is installed and
``--precision`` is ``auto``, and since 2026-12-05 also where the CPU has native bf16 (see :func:`auto_int8`): on
an Intel Xeon with AMX (family 6 model 207, 2 cores) bf16 made the nuclei depend on the region size, and int8
calibrated on each image was 1.15x bf16 on the network alone (7.55 against 6.54 MP/s, PQ 0.5762 against 0.5765)
and as fast end to end (the slide's calibration, and a network that is only 53-57% of the time there). There the
int8 graph's float operations run in bf16, compiled once for every shape: on 80 regions of the 20000² slide's
shapes, one thread, 16.0 s against 18.3 s with them in fp32 and 27.8 s compiled per shape. On Arm, OpenVINO
fp32/bf16 (int8 accuracy was not measured on Arm; whether bf16 depends on the region's shape there is not known).

The ONNX graph is exported from the artifact's safetensors (never shipped as a second source of truth) and
cached on disk under its content hash (``HISTOSEG_CACHE``, default ``~/.cache/histoseg``); a slide's adapted
weights are exported the same way, beside them in the slide's output folder, and removed with them. The
engine travels to every worker with the predictor; a worker that lacks it
fails with a clear error instead of silently computing other numbers.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoseg.atomic import atomic_file
from histoseg.config import RUNTIME_CHOICES
from histoseg.errors import ConfigError, ModelError, OutputError
from histoseg.models import ModelArtifact, load_model

CACHE_ENV = "HISTOSEG_CACHE"
ONNX_OPSET = 17
GRAPH_VERSION = 2
"""What the exported graph computes besides the weights; part of every engine's content key
(``predict._content_key``), so a graph cached by an older version is never reused. Bump when the outputs change.
2: the type map on the type head's own grid (``models.typemap``), no longer upsampled to every pixel."""
INT8_SUFFIX = "-int8"
_MODULES: dict[str, tuple[str, ...]] = {
    "openvino": ("openvino",),
    "onnxruntime": ("onnxruntime",),
    "openvino-int8": ("openvino", "onnxruntime"),  # ONNX Runtime's quantiser builds the int8 graph
    "onnxruntime-int8": ("onnxruntime",),
}

Engine = Callable[[np.ndarray], dict[str, np.ndarray]]
"""A compiled network: normalised (1, 3, H, W) float32 in, raw head outputs by name out."""


@dataclass(frozen=True)
class RuntimeChoice:
    """The engine used and why (recorded in provenance.json)."""

    runtime: str
    requested: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"runtime": self.runtime, "requested": self.requested, "reason": self.reason}


def available(runtime: str) -> bool:
    """Whether the engine's Python packages are installed (torch always is)."""
    return runtime == "torch" or all(importlib.util.find_spec(m) is not None for m in _MODULES[runtime])


def _packages(runtime: str) -> str:
    return " and ".join(_MODULES[runtime])


AUTO_ENGINE = "openvino"
"""What ``--runtime auto`` runs on a CPU when it is installed (the fastest fp32/bf16 engine measured, see above)."""
AUTO_INT8_ENGINE = AUTO_ENGINE + INT8_SUFFIX
"""What ``--runtime auto`` runs instead on an x86-64 CPU (:func:`auto_int8`)."""


def auto_int8(precision: str = "auto") -> tuple[bool, str]:
    """Whether ``--runtime auto`` runs OpenVINO int8 here, and why (a short phrase).

    On an x86-64 CPU, with ``--precision auto`` (an explicit precision asks for a float engine) and the quantiser
    installed. Without native bf16 it was measured to pay at no accuracy cost. With native bf16 (its float
    operations then in bf16) it replaces bf16 OpenVINO, whose outputs depend on the region's shape there, at the
    same speed end to end.

    Why: bf16 on an Intel Xeon with AMX (family 6 model 207; OpenVINO 2025.4-2026.4 and PyTorch alike) gives a
    pixel different values depending on where it falls in the network's input (its kernels treat the ends of a
    row apart): CMU-1-Small-Region with regions of 768 and of 2048 px, the NP probability differed at 27,772 of
    3.7 million pixels (by up to 0.0047) and one nucleus more was found with one size. With the int8 graph
    (integer convolutions) no pixel differed, with its float operations in bf16 or in fp32; fp32 neither."""
    from histoseg.inference.precision import X86_MACHINES, cpu_native_bf16

    machine = platform.machine().lower()
    if machine not in X86_MACHINES:
        return False, f"int8 accuracy was not measured on {machine or 'this'} CPUs"
    if precision != "auto":
        return False, f"--precision {precision} asks for a float engine"
    if not available(AUTO_INT8_ENGINE):
        return False, "int8 needs onnxruntime (its quantiser), not installed here"
    native, why = cpu_native_bf16()
    if native:
        return True, (
            f"x86 CPU with native bf16 ({why}): int8 calibrated on the slide, as fast as bf16 end to end and, unlike "
            "bf16, the same outputs whatever the region size"
        )
    return True, "x86 CPU without native bf16: int8 calibrated on the slide, 1.0-1.4x fp32 by CPU at the same PQ"


def resolve_runtime(requested: str, device: str = "cpu", precision: str = "auto") -> RuntimeChoice:
    """Check ``--runtime`` against the device and the installed packages; return the engine used and why.
    ``precision``: ``--precision`` (``auto`` lets ``--runtime auto`` pick int8, :func:`auto_int8`)."""
    if requested not in RUNTIME_CHOICES:
        raise ConfigError(f"--runtime must be one of {', '.join(RUNTIME_CHOICES)}, got {requested!r}")
    if requested == "auto":
        if device.startswith("cuda"):
            return RuntimeChoice("torch", requested, "auto: PyTorch on a GPU (the other engines run on the CPU)")
        if available(AUTO_ENGINE):
            int8, why = auto_int8(precision)
            if int8:
                return RuntimeChoice(AUTO_INT8_ENGINE, requested, f"auto: OpenVINO int8 ({why})")
            return RuntimeChoice(AUTO_ENGINE, requested, f"auto: OpenVINO is installed (fastest CPU engine; {why})")
        return RuntimeChoice("torch", requested, "auto: OpenVINO is not installed here")
    if device.startswith("cuda") and requested != "torch":
        raise ConfigError(f"--runtime {requested} runs on the CPU only; use --runtime torch with --device cuda")
    if not available(requested):
        raise ConfigError(
            f"--runtime {requested} needs {_packages(requested)}, not installed here "
            f"(pip install {' '.join(_MODULES[requested])})"
        )
    return RuntimeChoice(requested, requested, "requested")


def math_threads() -> int:
    """Math threads an engine gets in this process: PyTorch's setting where torch is loaded (a client that
    adapted), else ``OMP_NUM_THREADS`` (one per Dask worker, ``distributed.runner``), else the usable cores.
    Read without importing torch, so a worker that runs an exported engine never loads it."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return int(torch.get_num_threads())
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "histoseg"


EXPORT_GLOB = "*.onnx"
"""The graphs written into an export folder (fp32 exports and their int8 variants, ``inference.quantize``)."""


def export_folder(artifact: ModelArtifact) -> Path:
    """Where the artifact's exported graph is kept: beside a slide's adapted weights (removed with them after the
    slide's ``_SUCCESS``, so a batch does not leave a 10 MB graph per adapted slide in the cache), in the shared
    cache for every other model."""
    return artifact.weights.parent if artifact.per_slide else cache_dir() / "onnx"


def export_onnx(artifact: ModelArtifact, key: str) -> Path:
    """The artifact's network as ONNX (dynamic height and width), exported once per content ``key``."""
    target = export_folder(artifact) / f"{key}.onnx"
    if target.exists():
        return target
    import torch  # only to export: a worker that finds the graph never loads torch
    net, _ = load_model(artifact)
    names = tuple(net(torch.zeros(1, 3, 64, 64)).keys())

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.net(x, native_types=True)
            return tuple(out[n] for n in names)

    try:  # atomic: concurrent exporters write the same bytes, the last rename wins; a killed one leaves a
        # temporary that the slide folder's clean-up recognises (histoseg.atomic.remove_stale_temporaries)
        with atomic_file(target) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Wrapped().eval(),
                (torch.zeros(1, 3, 64, 64),),
                str(tmp),
                input_names=["x"],
                output_names=list(names),
                dynamic_axes={"x": {2: "h", 3: "w"}, **{n: {2: f"{n}_h", 3: f"{n}_w"} for n in names}},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
    except OutputError:
        raise
    except Exception as exc:
        raise ModelError(f"could not export {artifact.weights.name} to ONNX: {exc}") from exc
    return target


def engine_graph(artifact: ModelArtifact, key: str, runtime: str, calibration: str | None = None) -> Path:
    """The graph file ``runtime`` compiles for ``artifact`` (exported, and quantised for ``-int8``: on the crops of
    the ``calibration`` file when given, see ``inference.quantize``), written once.

    The pipeline calls this on the client before a slide's regions are sent out (``NetworkPredictor.prepare``),
    so workers find the graph and never import torch to export it."""
    path = export_onnx(artifact, key)
    if runtime.endswith(INT8_SUFFIX):
        from histoseg.inference.quantize import quantize_onnx

        path = quantize_onnx(path, artifact, key, calibration=None if calibration is None else Path(calibration))
    return path


def compile_engine(
    artifact: ModelArtifact, key: str, runtime: str, bf16: bool, threads: int, calibration: str | None = None
) -> Engine:
    """An engine for ``runtime`` over the cached ONNX export of ``artifact`` (``threads`` math threads)."""
    if not available(runtime):
        raise ModelError(
            f"runtime {runtime!r} was chosen for this run but {_packages(runtime)} is not installed "
            f"on this worker (pip install {' '.join(_MODULES[runtime])})"
        )
    path = engine_graph(artifact, key, runtime, calibration)
    engine = runtime.removesuffix(INT8_SUFFIX)
    if engine == "openvino":
        import openvino as ov

        from histoseg.inference.openvino_engine import OpenVinoEngine

        config = {
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",  # never let it pick bf16 on its own
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,
        }
        core = ov.Core()
        # fp32 float operations (fp32, and int8 without native bf16): compiled per input shape, for the memory
        # budget; hands its buffers back when idle (see there); bf16 (also int8's with native bf16) keeps one
        # dynamic compilation
        per_shape = not bf16
        return OpenVinoEngine(core, core.read_model(str(path)), config, per_shape=per_shape)
    if engine == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        out_names = [o.name for o in session.get_outputs()]

        def run_ort(x: np.ndarray) -> dict[str, np.ndarray]:
            res = session.run(out_names, {"x": x})
            return {n: np.asarray(r) for n, r in zip(out_names, res, strict=True)}

        return run_ort
    raise ConfigError(f"no compiled engine for runtime {runtime!r}")
