"""One process's memory stays flat from region to region with the default engine (issue 13: memory flat in
slide size). With ``--workers 1`` every region's result stays in the process until the slide is stitched, and
OpenVINO keeps its own buffers for the whole run; before the in-process runner handed the free heap back after
each task, the process grew by ~60 MB a region (7.1 GB after the 97 regions of a 10k² slide). The regions run
as ``segment`` runs them (the in-process runner, results kept) in a fresh interpreter, so this test's own heap
history does not count; the figure is resident memory as the kernel sees it, not an allocator statistic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from histoseg.distributed.runner import WORKER_ENV, WORKER_TUNABLES
from histoseg.inference.runtime import available

from .conftest import make_demo_slide

SCRIPT = """
import json, sys, psutil
from histoseg.config import SegmentConfig
from histoseg.distributed import InProcessRunner
from histoseg.pipeline.plan import default_predictor, plan_slide
from histoseg.pipeline.tasks import run_region

config = SegmentConfig(precision="fp32", region_size=512)
predictor = default_predictor(config)
plan = plan_slide(sys.argv[1], config, predictor)
kept, rss = [], []
with InProcessRunner() as runner:
    for _ in range(2):  # the first pass meets every window shape (tissue boxes differ in size) once
        for _, result in runner.imap_unordered(run_region, plan.regions, plan.spec, predictor):
            kept.append(result)  # as the slide pipeline does until it stitches
            rss.append(psutil.Process().memory_info().rss)
nuclei = sum(len(r.table) for r in kept)
print(json.dumps({"runtime": predictor.runtime, "regions": len(plan.regions), "nuclei": nuclei, "rss": rss}))
"""


@pytest.mark.skipif(not available("openvino"), reason="the default engine (OpenVINO) is not installed")
def test_resident_memory_is_flat_across_regions(tmp_path: Path) -> None:
    slide = make_demo_slide(tmp_path / "demo.tif", 3072, seed=5)  # 0.25 µm/px: 3x3 regions of 512 at 0.5
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(slide)], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["runtime"] == "openvino" and got["nuclei"] > 1000
    rss, n = got["rss"], got["regions"]
    assert n >= 8 and len(rss) == 2 * n
    # the first pass warms the engine and the caches up at every window size (a region's tissue box sets its
    # size, so the largest may come last); in the second pass, with every result still kept, nothing may
    # accumulate. Regions of 512 (896² network inputs with the halo) keep the test short: the leak this guards
    # against grew ~60 MB a 1024 region, ~15 MB at this size if it scales with the area; today's code grows -0.6 to
    # 1.7 MB a region here (2026-12-05, with and without the runner's periodic hand-back)
    growth_per_region = (rss[-1] - rss[n - 1]) / n
    assert growth_per_region < 6e6, [f"{r / 1e6:.0f} MB" for r in rss]


NO_TORCH = """
import sys
import histoseg.inference, histoseg.models, histoseg.pipeline.tasks
from histoseg.distributed.runner import limit_worker_threads
from histoseg.inference.runtime import math_threads
before = math_threads()
limit_worker_threads()
print(before, math_threads(), sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""


def test_a_worker_imports_no_torch_to_unpickle_a_region_task() -> None:
    """What a Dask worker imports to run ``run_region`` (the task, the predictor, the card, the thread limit)
    leaves torch out: it costs ~190 MB of resident memory in every worker process (issue 13: 2 workers under
    3 GB). Without torch, the engine's thread count comes from the worker's limit, not the job's environment."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "8"}  # a job's environment: the worker still runs one thread
    out = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "8 1 []"


def test_models_and_training_import_no_output_writers() -> None:
    """The model card writes through the layer-0 ``histoseg.atomic``, not the export layer: loading a model,
    training or adapting a cohort leaves zarr, shapely and pyarrow (the writers' libraries) unimported, so a
    worker or a training job starts lighter and runs where those are not installed."""
    code = (
        "import sys, histoseg.models, histoseg.cohort.train, histoseg.training.train, histoseg.tta; "
        "print(sorted(m for m in ('zarr', 'shapely', 'pyarrow', 'histoseg.export') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(not available("openvino"), reason="the default engine (OpenVINO) is not installed")
def test_dask_workers_run_the_default_engine_without_torch(tmp_path: Path) -> None:
    """A real 2-worker run with the default settings (adaptation included): the client writes the adapted
    weights' graph before the regions go out, so the workers compute every region without importing torch, and
    find the same nuclei as one process."""
    from histoseg.config import SegmentConfig
    from histoseg.distributed import InProcessRunner, local_dask_runner
    from histoseg.pipeline import segment_slide

    slide = make_demo_slide(tmp_path / "demo.tif", 4096, seed=3)  # 0.25 µm/px: 2x2 regions of 1024 at 0.5
    config = SegmentConfig(precision="fp32")
    keys = ("GLIBC_TUNABLES", "OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    before = {k: os.environ.get(k) for k in keys}
    with local_dask_runner(2) as runner:
        two = segment_slide(slide, tmp_path / "two", config, runner)
        loaded = runner.client.run(lambda: "torch" in __import__("sys").modules)
        tunables = runner.client.run(lambda: __import__("os").environ.get("GLIBC_TUNABLES", ""))
        kernels = runner.client.run(lambda: __import__("os").environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"))
        leaked = os.environ.get("GLIBC_TUNABLES", "")  # Dask's nannies copy their spawn environment here
    # ... and the caller's environment is back once the runner closes
    assert "glibc.malloc.hugetlb" in leaked and {k: os.environ.get(k) for k in keys} == before
    one = segment_slide(slide, tmp_path / "one", config, InProcessRunner())
    assert two.status == one.status == "ok" and two.nuclei == one.nuclei > 100
    assert loaded and not any(loaded.values()), loaded
    # the workers started with huge pages for their engine buffers (distributed.runner.worker_tunables)
    # and glibc's thresholds that keep a region's arrays for the next region (the same tunables' string)
    want = {f"{k}={v}" for k, v in WORKER_TUNABLES.items()}
    assert all(want <= set(v.split(":")) for v in tunables.values()), tunables
    # and oneDNN's kernel cache bounded (distributed.runner.WORKER_ENV), where the test's caller did not set it
    mine = before["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]
    assert set(kernels.values()) == {mine or WORKER_ENV["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]}, kernels
    import pyarrow.parquet as pq

    a, b = (pq.read_table(tmp_path / run / "demo" / "demo.nuclei.parquet") for run in ("one", "two"))
    assert a.equals(b)
