"""One process's memory stays flat from region to region with the default engine (issue 13: memory flat in
slide size). With ``--workers 1`` every region's result stays in the process until the slide is stitched, and
OpenVINO keeps its own buffers for the whole run; before the in-process runner handed the free heap back after
each task, the process grew by ~60 MB a region (7.1 GB after the 97 regions of a 10k² slide). The regions run
as ``segment`` runs them (the in-process runner, results kept) in a fresh interpreter, so this test's own heap
history does not count; the figure is resident memory as the kernel sees it, not an allocator statistic.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from histoseg.inference.runtime import available

from .conftest import make_demo_slide

SCRIPT = """
import json, sys, psutil
from histoseg.config import SegmentConfig
from histoseg.distributed import InProcessRunner
from histoseg.pipeline.plan import default_predictor, plan_slide
from histoseg.pipeline.tasks import run_region

config = SegmentConfig(precision="fp32")
predictor = default_predictor(config)
plan = plan_slide(sys.argv[1], config, predictor)
kept, rss = [], []
with InProcessRunner() as runner:
    for _, result in runner.imap_unordered(run_region, plan.regions, plan.spec, predictor):
        kept.append(result)  # as the slide pipeline does until it stitches
        rss.append(psutil.Process().memory_info().rss)
print(json.dumps({"runtime": predictor.runtime, "nuclei": sum(len(r.table) for r in kept), "rss": rss}))
"""


@pytest.mark.skipif(not available("openvino"), reason="the default engine (OpenVINO) is not installed")
def test_resident_memory_is_flat_across_regions(tmp_path: Path) -> None:
    slide = make_demo_slide(tmp_path / "demo.tif", 6144, seed=5)  # 0.25 µm/px: 3x3 regions of 1024 at 0.5
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(slide)], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["runtime"] == "openvino" and got["nuclei"] > 1000
    rss = got["rss"]
    assert len(rss) >= 8
    # the first regions warm the engine and the caches up; after that, nothing may accumulate
    growth_per_region = (rss[-1] - rss[2]) / (len(rss) - 3)
    assert growth_per_region < 10e6, [f"{r / 1e6:.0f} MB" for r in rss]
