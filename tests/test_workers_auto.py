"""``--workers auto`` (the command line's default): one local worker per usable core, as many as the memory holds;
1 for GPU workers, a running scheduler and job queues, which size themselves."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from histoseg.cli.main import build_parser
from histoseg.cli.segment import cluster_from_args, config_from_args, worker_count
from histoseg.config import MAX_WORKERS, SegmentConfig
from histoseg.distributed import ClusterSpec
from histoseg.distributed.capacity import (
    GPU_WORKER_MEMORY,
    SMALL_SLIDE_INPUT,
    WORKER_MEMORY,
    Capacity,
    gpu_free_memory,
    machine_capacity,
    usable_cores,
)
from histoseg.distributed.lazy import LazyRunner
from histoseg.distributed.runner import InProcessRunner
from histoseg.pipeline import segment_batch
from histoseg.tiling import TISSUE_CELL, network_input, plan_regions


def test_capacity_takes_the_smaller_of_cores_and_memory() -> None:
    assert Capacity(cores=8, memory=None).workers == 8
    assert Capacity(cores=8, memory=3 * WORKER_MEMORY + WORKER_MEMORY // 2).workers == 3
    assert Capacity(cores=2, memory=64 * WORKER_MEMORY).workers == 2
    assert Capacity(cores=16, memory=WORKER_MEMORY // 3).workers == 1  # at least one, in this process
    assert Capacity(cores=4096, memory=None).workers == MAX_WORKERS
    assert Capacity(cores=4, memory=2 * WORKER_MEMORY).describe().startswith("2 worker(s): 4 usable core(s), 3.0 GiB")


def test_workers_sharing_a_gpu_are_as_many_as_its_free_memory_holds() -> None:
    """16 cores and a 24 GiB GPU: 16 workers would need ~28 GB there (measured on an H200), so 11 of them; the
    GPU's memory does not count for CPU workers."""
    big = 64 * WORKER_MEMORY
    assert Capacity(cores=16, memory=big, gpu_memory=None).workers == 16
    assert Capacity(cores=16, memory=big, gpu_memory=24 * 2**30 - 2**29).workers == 11
    assert Capacity(cores=16, memory=big, gpu_memory=140 * 2**30).workers == 16  # the cores bound an H200
    assert Capacity(cores=16, memory=big, gpu_memory=GPU_WORKER_MEMORY // 2).workers == 1
    assert Capacity(cores=4, memory=big, gpu_memory=4 * 2**30).describe().endswith("4.0 GiB free on the shared GPU")


def test_cpu_devices_read_no_gpu_memory() -> None:
    assert gpu_free_memory("cpu") is None
    import torch

    if not torch.cuda.is_available():  # CI: asking for a GPU this machine lacks leaves the count to the cores
        assert gpu_free_memory("cuda") is None and gpu_free_memory("cuda:3") is None
    else:
        free = gpu_free_memory("cuda")
        assert free is not None and 0 < free <= torch.cuda.mem_get_info(0)[1]


@pytest.mark.skipif(shutil.which("taskset") is None or not hasattr(os, "sched_getaffinity"), reason="needs taskset")
def test_usable_cores_follow_the_affinity_mask() -> None:
    """A process pinned to one core (``taskset``, a SLURM job's cpuset) counts one core, not the host's."""
    code = "import json; from histoseg.distributed.capacity import usable_cores; print(json.dumps(usable_cores()))"
    first = sorted(os.sched_getaffinity(0))[0]
    out = subprocess.run(["taskset", "-c", str(first), sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert json.loads(out.stdout) == 1
    assert usable_cores() == len(os.sched_getaffinity(0))


def test_the_default_is_auto_on_a_plain_local_cluster() -> None:
    for argv in ([], ["--workers", "auto"]):
        before = machine_capacity().workers  # read around the call: the available memory may move meanwhile
        args = build_parser().parse_args(["segment", "x.svs", "-o", "out", *argv])
        cluster = cluster_from_args(args)
        assert cluster.workers == config_from_args(args, cluster).workers
        assert cluster.workers in (before, machine_capacity().workers) and cluster.auto
    args = build_parser().parse_args(["segment", "x.svs", "-o", "out", "--workers", "3"])
    assert cluster_from_args(args).workers == 3 and not cluster_from_args(args).auto


@pytest.mark.parametrize(
    "flags",
    [["--cluster", "slurm"], ["--scheduler", "tcp://127.0.0.1:8786"], ["--gpus", "all"],
     ["--cluster", "slurm", "--workers", "auto"]],
)  # fmt: skip
def test_auto_is_one_where_the_cluster_sizes_itself(flags: list[str]) -> None:
    args = build_parser().parse_args(["segment", "x.svs", "-o", "out", *flags])
    assert worker_count(args) == 1


def test_a_bad_worker_count_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["segment", "x.svs", "-o", "out", "--workers", "many"])
    assert exc.value.code == 2
    assert "not a number or 'auto': 'many'" in capsys.readouterr().err


def test_lazy_runner_takes_the_small_runner_for_a_small_first_request() -> None:
    started: list[str] = []

    def start(kind: str) -> Callable[[], InProcessRunner]:
        return lambda: started.append(kind) or InProcessRunner()

    for tasks, kind in ((11, "small"), (12, "workers")):
        lazy = LazyRunner(start("workers"), small=start("small"), small_below=12)  # the default size: the count
        assert sorted(r for _, r in lazy.imap_unordered(lambda x: x + 1, range(tasks))) == list(range(1, tasks + 1))
        assert started[-1] == kind
        list(lazy.imap_unordered(lambda x: x, range(50)))  # later requests keep the runner started first
        assert len(started) == (1 if kind == "small" else 2)
        lazy.close()


def test_a_slide_is_small_by_the_pixels_its_regions_give_the_network() -> None:
    """The work of regions is their read boxes' area (tissue box plus halo; beyond the slide's edge the network still
    reads padding), not their count: one region of 2048 px is more work than eight slivers."""
    plane = (4096, 4096)
    big = plan_regions(plane, 2048, 192)[:1]
    assert network_input(big) == (2048 + 2 * 192) ** 2 > SMALL_SLIDE_INPUT
    cells = np.zeros((4096 // TISSUE_CELL, 4096 // TISSUE_CELL), bool)
    cells[::16, ::16] = True  # one 32-px tissue cell in each 512-px core
    slivers = plan_regions(plane, 512, 192, cells)[:8]
    assert len(slivers) == 8 and network_input(slivers) == 8 * (32 + 2 * 192) ** 2 < SMALL_SLIDE_INPUT


def _tissue_png(path: Path, side: int) -> Path:
    rng = np.random.default_rng(0)
    img = np.full((side, side, 3), (230, 170, 200), np.uint8)
    for y, x in rng.integers(10, side - 10, size=(side * side // 4000, 2)):
        cv2.circle(img, (int(x), int(y)), 7, (90, 40, 120), -1)
    cv2.imwrite(str(path), img[..., ::-1])
    return path


def test_auto_runs_a_lone_small_slide_in_this_process_and_starts_workers_for_more(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The Dask dashboard line is logged when a cluster starts: none for 16 regions whose read boxes give the
    network 3.9 MP (under ``SMALL_SLIDE_INPUT``), one for 29 regions, 6.1 MP (real workers), and the nuclei are the
    same either way."""
    png = _tissue_png(tmp_path / "tissue.png", 512)
    tables = {}
    for region, cluster_started in ((128, False), (96, True)):  # 16 and 29 regions of 512² px
        cfg = SegmentConfig(slide_mpp=0.5, region_size=region, tta="none", report=False, formats=("parquet",))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="histoseg"):
            out = tmp_path / f"out{region}"
            (report,) = segment_batch([str(png)], out, cfg, cluster=ClusterSpec(workers=2, auto=True))
        assert report.status == "ok", report.message
        assert ("dask dashboard" in caplog.text) is cluster_started, caplog.text
        record = json.loads((out / "tissue" / "provenance.json").read_text())
        assert record["processing"]["workers"] == (2 if cluster_started else 1)
        tables[region] = pd.read_parquet(out / "tissue" / "tissue.nuclei.parquet")
    assert len(tables[128]) == len(tables[96]) > 10
