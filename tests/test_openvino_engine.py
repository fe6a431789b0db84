"""The OpenVINO engine compiles each input shape (less memory than one dynamic compilation, same outputs) and
hands its working buffers back when idle (issue 13: peak memory while the client exports); the network's outputs
depend on neither."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from histoseg.inference.runtime import available

pytestmark = pytest.mark.skipif(not available("openvino"), reason="the default engine (OpenVINO) is not installed")


def _engine(idle: float, shapes_kept: int = 4, per_shape: bool = True):  # type: ignore[no-untyped-def]
    from histoseg.inference.openvino_engine import OpenVinoEngine
    from histoseg.inference.predict import _cached_engine
    from histoseg.models import resolve_model

    engine, _ = _cached_engine(resolve_model("default"), "openvino", False)
    assert isinstance(engine, OpenVinoEngine)
    assert engine.per_shape  # fp32 (the cached engine's precision here) compiles per shape
    return OpenVinoEngine(
        engine._core, engine._model, engine._config, per_shape=per_shape, idle_release_s=idle, shapes_kept=shapes_kept
    )


def test_each_shape_is_compiled_once_with_the_outputs_of_a_dynamic_compilation() -> None:
    """Outputs bit-identical to one compilation for any input shape (what the engine did before); a shape in use
    again is not compiled again; beyond ``shapes_kept`` the least recently used compilation is dropped."""
    engine = _engine(idle=3600.0, shapes_kept=2)
    dynamic = engine._core.compile_model(engine._model, "CPU", engine._config)
    rng = np.random.default_rng(1)
    xs = {s: rng.random((1, 3, *s), dtype=np.float32) for s in ((160, 224), (96, 128), (224, 96))}
    for shape in ((160, 224), (96, 128), (160, 224), (224, 96), (96, 128)):
        got = engine(xs[shape])
        want = dynamic([xs[shape]])
        for i, name in enumerate(engine.names):
            np.testing.assert_array_equal(got[name], np.asarray(want[i]))
    # compiled: 160x224, 96x128, (160x224 reused), 224x96 (drops 96x128), 96x128 again
    assert engine.compilations == 4
    assert list(engine._compiled) == [(1, 3, 224, 96), (1, 3, 96, 128)]
    once = _engine(idle=3600.0, per_shape=False)  # bf16's way: one dynamic compilation for every shape
    for x in xs.values():
        got = once(x)
        want = dynamic([x])
        for i, name in enumerate(once.names):
            np.testing.assert_array_equal(got[name], np.asarray(want[i]))
    assert once.compilations == 1 and list(once._compiled) == [None]


def test_release_waits_for_idleness_and_keeps_outputs_bit_identical() -> None:
    engine = _engine(idle=3600.0)
    x = np.random.default_rng(0).random((1, 3, 256, 320), dtype=np.float32)
    first = engine(x)
    assert not engine.release_if_idle(time.monotonic())  # just used: kept
    assert engine.release_if_idle(time.monotonic() + 3601.0)  # idle long enough: released
    assert not engine.release()  # nothing left to release
    again = engine(x)  # buffers allocated afresh
    assert engine.release() and engine.releases == 2
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])


SCRIPT = """
import json, time, psutil, numpy as np
import histoseg.inference.openvino_engine as oe
oe.IDLE_RELEASE_S = 0.5
from histoseg.inference.predict import _cached_engine
from histoseg.models import resolve_model
engine, _ = _cached_engine(resolve_model("default"), "openvino", False)
me = psutil.Process()
engine(np.random.default_rng(0).random((1, 3, 1024, 1024), dtype=np.float32))
busy = me.memory_info().rss
time.sleep(3.0)  # the janitor polls every second
print(json.dumps({"busy": busy, "idle": me.memory_info().rss, "releases": engine.releases}))
"""


def test_an_idle_process_gives_the_buffers_back_to_the_kernel() -> None:
    """Resident memory as the kernel sees it, in a fresh interpreter: the janitor thread releases a 1024²
    inference's buffers (measured ~0.5 GB) once the engine has been idle."""
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["releases"] == 1
    assert got["busy"] - got["idle"] > 200e6, got


GROWTH_SCRIPT = """
import json, sys, psutil, numpy as np
from histoseg.inference.openvino_engine import OpenVinoEngine
from histoseg.inference.predict import _cached_engine
from histoseg.models import resolve_model
cached, _ = _cached_engine(resolve_model("default"), "openvino", False)
if sys.argv[1] == "engine":  # the engine's one dynamic compilation (bf16's way), DYNAMIC_CONFIG applied
    engine = OpenVinoEngine(cached._core, cached._model, cached._config, per_shape=False, idle_release_s=3600.0)
    run = lambda x: engine(x)
else:  # the plugin's defaults: its per-shape kernel cache kept
    compiled = cached._core.compile_model(cached._model, "CPU", cached._config)
    run = lambda x: compiled([x])
rng = np.random.default_rng(0)
me = psutil.Process()
run(rng.random((1, 3, 512, 512), dtype=np.float32))
start = me.memory_info().rss
for i in range(81):  # 81 distinct shapes, as a slide's regions come (tissue boxes plus halo)
    run(rng.random((1, 3, 32 * (8 + i % 9), 32 * (8 + i // 9)), dtype=np.float32))
print(json.dumps({"growth": me.memory_info().rss - start}))
"""


def test_the_dynamic_compilation_does_not_grow_with_each_new_input_shape() -> None:
    """A slide's regions come in dozens of shapes; the plugin's per-shape kernel cache kept memory for each
    (measured: +230 MB over these 81 shapes with it, 83-104 MB without; DYNAMIC_CONFIG), and oneDNN's cache of
    generated kernels too (a worker's environment bounds it: distributed.runner.WORKER_ENV; 93-99 -> 64-70 MB).
    Fresh interpreters, each with oneDNN's cache as the case says."""
    import os

    from histoseg.distributed.runner import WORKER_ENV

    growth = {}
    for how, kernels in (("plugin-defaults", {}), ("engine", {}), ("engine", WORKER_ENV)):
        env = {k: v for k, v in os.environ.items() if k not in WORKER_ENV} | kernels
        out = subprocess.run(
            [sys.executable, "-c", GROWTH_SCRIPT, how], capture_output=True, text=True, check=True, env=env
        )
        growth[how + (" in a worker" if kernels else "")] = json.loads(out.stdout.strip().splitlines()[-1])["growth"]
    assert growth["plugin-defaults"] > 150e6, growth  # the caches' growth is there to be removed
    assert growth["engine"] < 0.65 * growth["plugin-defaults"], growth
    assert growth["engine in a worker"] < 0.85 * growth["engine"], growth
