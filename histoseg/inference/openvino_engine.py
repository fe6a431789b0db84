"""An OpenVINO network compiled for each input shape it meets, that hands its working buffers back when its
process stops using it.

Why one compilation per shape: compiled for a dynamic input (any H, W), OpenVINO's CPU plugin kept ~1.05 GB
of working buffers after a 1408² region of the default network (fp32); compiled for that exact shape, it
plans the buffers' reuse ahead and keeps ~0.65 GB, with bit-identical outputs (tested). With two workers that
is the difference between 3.35 and 2.73 GB of peak RSS on a 10000² slide in fp32 (issue 13's 3 GB budget).
A slide's regions come in a few dozen shapes (tissue boxes plus halo, multiples of 32 px), and a new shape
costs a compilation (~0.2 s, ~36 MB) and fresh buffers, so the engine keeps the ``SHAPES_KEPT`` most recently
used compilations and lets only the one in use hold buffers; worker processes map those buffers with huge
pages (:func:`histoseg.distributed.runner.worker_tunables`), which took the extra system time of the shape changes
from ~17 s to ~2 s on a 10000² slide. Net cost there: ~2% of the wall time (2-core Intel
Xeon, AVX-512 and AMX, fp32, 2 workers). In bf16 the buffers are half as large, two workers stay within the
budget with one dynamic compilation (2.71 GB), and the compilations cost more than they save (network time
+23% there; +20% wall on a 20000² slide, 2-core Xeon with AMX, for 2.90 against 3.36 GB),
so :func:`histoseg.inference.runtime.compile_engine` compiles per shape only where the float operations are fp32
(fp32, and int8 on CPUs without native bf16); the dynamic compilation keeps no per-shape kernel cache
(:data:`DYNAMIC_CONFIG`).

int8 (what ``auto`` runs on x86 CPUs without native bf16) gains the same way. Alone, a process held ~0.72 GB
after 1408² and 1152x1408 regions against ~0.99 GB with one dynamic compilation, at the same seconds per region;
end to end (``benchmarks.throughput``, 10000² slide, 2 workers, both in one run; first-generation AMD EPYC, AVX2
only) the peak fell from 2.86 to 2.15 GB for 8% more wall time (network +10%: the compilations and fresh buffers
of shape changes), and with one dynamic compilation the 20000² slide had exceeded 3 GB (3.20 GB). Its outputs
are not always bit-identical to the dynamic compilation's: the static int8 kernels round some requantisations
differently (on real tissue the maps were equal to the bit and the slides' nuclei the same; on random inputs up
to 0.12 of a logit). What the pipeline needs holds and is tested: a pixel's outputs do not depend on the input's
shape, so the results do not depend on the region size.

Why the hand-back: OpenVINO keeps the buffers of its last inference for as long as the compiled model
lives, so that the next region does not pay to fault them in again (~0.45 s a time). That is right while
regions keep coming, but a worker idles between slides and while the client stitches and exports, and then
those buffers are only a second copy of the peak: with two workers they held ~2.8 GB while the client
exported a 20k² slide. So each engine notes when it last ran; one daemon thread a process (started with the
first engine, not at import) releases the buffers of every engine idle for ``IDLE_RELEASE_S``. A region that
comes after that allocates them again, once. The outputs do not depend on it (the buffers are workspace,
written before read; tested bit for bit). A lock keeps a release from running beside an inference, and two
inferences from running on one compiled model at once (its implicit request is not meant for concurrent
calls).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np

DYNAMIC_CONFIG: dict[str, Any] = {"CPU_RUNTIME_CACHE_CAPACITY": 0}
"""CPU plugin settings of the one dynamic compilation (bf16, and int8 where bf16 is native), beside the engine's own.

The CPU plugin keeps, for a dynamic compilation, a cache of the kernels it prepared for each input shape (5000
entries by default), and a slide's regions come in many shapes (71 distinct ones on the 20000² benchmark slide, a
new one at 345 of its 379 regions): each new shape added memory that stayed. Measured on a 2-core Intel Xeon
(AVX-512, AMX), default network, bf16, one process: 1.67 GB resident after 120 regions of random shapes up to
1408² with the cache against 0.98 GB without it, at the same seconds per region (22.1 against 22.9 s; the same
shape again: 0.31 s either way, within the noise); a process running 81 fp32 shapes up to 512² grew 230 MB with
it and 83-104 MB without. Outputs are bit-identical (tested). Per-shape compilations (fp32, int8) keep one shape
each, so they are left as they are."""

IDLE_RELEASE_S = 3.0  # seconds without an inference before an engine's buffers go back
SHAPES_KEPT = 2  # compiled input shapes kept for reuse (each ~36 MB without its buffers)
_POLL_S = 1.0

_WATCHED: weakref.WeakSet[OpenVinoEngine] = weakref.WeakSet()
_JANITOR: threading.Thread | None = None
_JANITOR_LOCK = threading.Lock()


class OpenVinoEngine:
    """Callable engine: normalised (N, 3, H, W) float32 in, the network's raw outputs by name out.

    ``core``, ``model`` and ``config``: the ``openvino.Core``, the network read from its graph file (dynamic
    input) and the CPU plugin's settings. ``per_shape``: each input shape gets its own compilation of a copy
    of ``model`` (see the module's docstring); otherwise ``model`` is compiled once for every shape."""

    def __init__(
        self, core: Any, model: Any, config: dict[str, Any], *, per_shape: bool = True,
        idle_release_s: float | None = None, shapes_kept: int = SHAPES_KEPT,
    ) -> None:
        if len(model.inputs) != 1:
            raise ValueError(f"the network must have one input, it has {len(model.inputs)}")
        self._core, self._model, self._config = core, model, dict(config)
        self._input = model.inputs[0].get_any_name()
        self._idle = IDLE_RELEASE_S if idle_release_s is None else idle_release_s
        self.per_shape = per_shape
        self._kept = max(1, int(shapes_kept))
        self._compiled: OrderedDict[tuple[int, ...] | None, Any] = OrderedDict()
        self._active: Any = None  # the compiled model whose buffers may still be held
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self.releases = 0  # how many times the buffers went back (tests and benchmarks read it)
        self.compilations = 0  # how many input shapes were compiled (tests and benchmarks read it)
        self.names = [o.get_any_name() for o in model.outputs]
        _watch(self)

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        with self._lock:
            compiled = self._for_shape(tuple(int(v) for v in x.shape) if self.per_shape else None)
            if self._active is not None and self._active is not compiled:
                self._active.release_memory()  # one set of working buffers at a time
            self._active = compiled
            res = compiled([x])  # outputs are copied out of the request (share_outputs=False)
            self._last = time.monotonic()
            return {n: np.asarray(res[i]) for i, n in enumerate(self.names)}

    def _for_shape(self, shape: tuple[int, ...] | None) -> Any:
        """The compilation for ``shape`` (None: the dynamic one); the most recently used ones are kept."""
        compiled = self._compiled.get(shape)
        if compiled is not None:
            self._compiled.move_to_end(shape)
            return compiled
        model = self._model
        if shape is not None:
            model = model.clone()
            model.reshape({self._input: list(shape)})
        config = self._config if shape is not None else {**self._config, **DYNAMIC_CONFIG}
        compiled = self._compiled[shape] = self._core.compile_model(model, "CPU", config)
        self.compilations += 1
        while len(self._compiled) > self._kept:
            _, old = self._compiled.popitem(last=False)
            if old is self._active:
                self._active = None
        return compiled

    def release(self) -> bool:
        """Hand the working buffers back now (True when there were any); waits for a running inference."""
        with self._lock:
            return self._release()

    def release_if_idle(self, now: float) -> bool:
        """Release when no inference ran for ``idle_release_s``; never waits for one that is running."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            return now - self._last >= self._idle and self._release()
        finally:
            self._lock.release()

    def _release(self) -> bool:
        if self._active is None:
            return False
        self._active.release_memory()
        self._active = None
        self.releases += 1
        return True


def _watch(engine: OpenVinoEngine) -> None:
    """Register ``engine`` with this process's janitor thread, starting the thread the first time."""
    global _JANITOR
    with _JANITOR_LOCK:
        _WATCHED.add(engine)
        if _JANITOR is None or not _JANITOR.is_alive():
            _JANITOR = threading.Thread(target=_janitor, name="histoseg-engine-janitor", daemon=True)
            _JANITOR.start()


def _janitor() -> None:
    while True:
        time.sleep(_POLL_S)
        now = time.monotonic()
        for engine in list(_WATCHED):
            engine.release_if_idle(now)
