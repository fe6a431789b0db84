"""Cluster factory (histoseg.distributed): settings checks, GPU pinning without a GPU, job scripts, a
running scheduler, lazy start. The real SLURM run is in test_slurm.py.

Also holds the small real slides and model that test_slurm.py and test_workflows.py share.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from histoseg.cli.main import main
from histoseg.distributed import ClusterSpec, open_runner
from histoseg.distributed.gpu import gpu_runner, resolve_gpus
from histoseg.distributed.jobqueue import cluster_kwargs, make_jobqueue_cluster
from histoseg.distributed.lazy import LazyRunner
from histoseg.errors import ConfigError, HistosegError
from histoseg.inference.eager import run_network
from histoseg.io import open_slide, write_pyramidal_tiff
from histoseg.models import ModelCard, NetConfig, NucleiNet, registered_models, save_model
from histoseg.types import Box

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
CMU1 = Path("slides/aperio-cmu1-small/CMU-1-Small-Region.svs")
CROPS = ((400, 600), (1300, 1900))  # top-left corners of tissue-rich crops of CMU-1 (level 0)


def write_cmu1_crops(shared_data: Path, folder: Path, size: tuple[int, int] = (768, 512)) -> list[Path]:
    """Two small real H&E slides: crops of CMU-1-Small-Region.svs written as tiled TIFFs with its mpp."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    with open_slide(shared_data / CMU1) as reader:
        mpp = float(reader.meta.mpp or 0.499)
        for i, (x, y) in enumerate(CROPS):
            path = folder / f"cmu1-crop{i}.tif"
            write_pyramidal_tiff(path, reader.read_level(0, Box(x, y, *size)), size, mpp, compression="zlib")
            out.append(path)
    return out


def model_arguments(folder: Path, slide: Path) -> list[str]:
    """``--model`` and ``--region-size`` for fast end-to-end runs: the shipped default when registered;
    otherwise a small random network (width 8) whose NP threshold is set so that it finds blobs."""
    if "default" in registered_models():
        return ["--model", "default", "--region-size", "256"]
    weights = folder / "tiny.safetensors"
    if not weights.exists():
        torch.manual_seed(0)
        net_cfg = NetConfig(width=8)
        net = NucleiNet(net_cfg).eval()
        card = ModelCard(name="tiny-random", net=net_cfg, mpp=0.5, context_radius_px=8, max_nucleus_um=8.0)
        with open_slide(slide) as reader:
            image = reader.read_level(0, Box(0, 0, *reader.meta.dimensions))
        np_prob = run_network(net, card, image)[0]
        card.postprocess = {"np_threshold": float(np.quantile(np_prob, 0.8))}
        save_model(net, card, weights)
    return ["--model", str(weights), "--region-size", "128"]


# -- settings checks -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "sge"}, "unknown --cluster"),
        ({"workers": 0}, "--workers"),
        ({"kind": "slurm", "jobs": 0}, "--jobs"),
        ({"kind": "slurm", "memory": "lots"}, "--memory"),
        ({"gpus": "first"}, "--gpus"),
        ({"gpus": "0,0"}, "twice"),
        ({"gpus": "all", "workers": 2}, "drop --workers"),
        ({"kind": "slurm", "gpus": "all"}, "--gres"),
        ({"kind": "slurm", "scheduler": "tcp://h:8786"}, "--scheduler"),
        ({"jobs": 4}, "--jobs only apply to a job queue"),
        ({"queue": "gpu", "memory": "8GB"}, "--memory, --queue only apply"),
        ({"kind": "pbs", "workers": 4}, "use --jobs"),
    ],
)
def test_bad_cluster_settings_are_config_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ClusterSpec(**kwargs)  # type: ignore[arg-type]


def test_gpu_request_maps_to_visible_devices() -> None:
    assert resolve_gpus("all", count=2, visible="") == ["0", "1"]
    assert resolve_gpus("1", count=2, visible="4,5") == ["5"]
    assert resolve_gpus("0,1", count=2, visible="GPU-a,GPU-b") == ["GPU-a", "GPU-b"]
    with pytest.raises(ConfigError, match="index 2 does not exist"):
        resolve_gpus("0,2", count=2, visible="")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_gpus("all", count=0)


def test_gpus_without_gpu_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.device_count():
        pytest.skip("this machine has a GPU")
    slide = tmp_path / "s.tif"
    slide.write_bytes(b"not read: the cluster check comes first")
    assert main(["segment", str(slide), "-o", str(tmp_path / "out"), "--gpus", "all"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("histoseg: error: --gpus all: no CUDA GPU"), err
    assert main(["segment", str(slide), "-o", str(tmp_path / "out"), "--gpus", "0", "--device", "cpu"]) == 1
    assert "--device cpu" in capsys.readouterr().err


def test_gpu_workers_are_pinned_one_device_each() -> None:
    """The fallback without dask-cuda, on CPU: each worker's environment names its own device."""
    with gpu_runner(["3", "5"], use_dask_cuda=False) as runner:
        seen = runner.client.run(lambda: (os.environ.get("CUDA_VISIBLE_DEVICES"), torch.get_num_threads()))
        assert sorted(seen.values()) == [("3", 1), ("5", 1)]
        assert all(w["nthreads"] == 1 for w in runner.client.scheduler_info()["workers"].values())


# -- job queues ------------------------------------------------------------------------------------


def test_job_settings_flags_over_file_and_single_threaded_workers(tmp_path: Path) -> None:
    cfg = tmp_path / "jobqueue.yaml"
    cfg.write_text(
        "jobqueue:\n  slurm:\n    cores: 4\n    memory: 16GB\n    walltime: '01:00:00'\n    queue: cpu\n"
        "    job-extra-directives: ['--constraint=avx2']\n    local-directory: $TMPDIR\n    name: null\n"
    )
    spec = ClusterSpec(kind="slurm", config_file=str(cfg), queue="gpu", account="lab", job_extra=("--gres=gpu:1",))
    kw = cluster_kwargs(spec, tmp_path / "logs")
    assert kw["cores"] == 4 and kw["processes"] == 4 and kw["memory"] == "16GB"
    assert kw["queue"] == "gpu" and kw["account"] == "lab" and kw["local_directory"] == "$TMPDIR"
    assert kw["job_extra_directives"] == ["--constraint=avx2", "--gres=gpu:1"]
    assert kw["log_directory"] == str(tmp_path / "logs") and "name" not in kw
    cluster = make_jobqueue_cluster(spec, tmp_path / "logs")
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in ("#SBATCH -p gpu", "#SBATCH -A lab", "#SBATCH --gres=gpu:1", "#SBATCH -t 01:00:00"):
        assert line in script
    assert "export OMP_NUM_THREADS=1" in script and "--nthreads 1" in script
    assert "export GLIBC_TUNABLES=" in script and "glibc.malloc.hugetlb=1" in script  # engine buffers, huge pages
    assert "glibc.malloc.mmap_threshold=8388608" in script  # and the thresholds of local workers


def test_lsf_account_is_its_project_and_pbs_script_builds(tmp_path: Path) -> None:
    kw = cluster_kwargs(ClusterSpec(kind="lsf", account="lab", memory="4GB"))
    assert kw["project"] == "lab" and "account" not in kw and kw["cores"] == 1
    cluster = make_jobqueue_cluster(ClusterSpec(kind="pbs", memory="4GB", cores=2, queue="workq"))
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#PBS -q workq" in script and "--nthreads 1" in script


def test_bad_cluster_config_files(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("jobqueue:\n  slurm:\n    cores: 2\n    memroy: 4GB\n")
    with pytest.raises(ConfigError, match="unknown key.*memroy"):
        cluster_kwargs(ClusterSpec(kind="slurm", config_file=str(cfg)))
    cfg.write_text("jobqueue:\n  pbs:\n    cores: 2\n")
    with pytest.raises(ConfigError, match="no 'jobqueue: slurm:' section"):
        cluster_kwargs(ClusterSpec(kind="slurm", config_file=str(cfg)))
    with pytest.raises(ConfigError, match="needs the memory"):
        cluster_kwargs(ClusterSpec(kind="slurm", cores=2))
    with pytest.raises(ConfigError, match="cannot read"):
        cluster_kwargs(ClusterSpec(kind="slurm", config_file=str(tmp_path / "missing.yaml")))


@pytest.mark.parametrize("kind", ["slurm", "pbs", "lsf"])
def test_shipped_example_cluster_configs_are_valid(kind: str) -> None:
    kw = cluster_kwargs(ClusterSpec(kind=kind, config_file=str(WORKFLOWS / "jobqueue.yaml")))
    assert kw["cores"] == kw["processes"] == 8 and kw["memory"] == "32GB"
    if kind == "slurm":
        gpu = cluster_kwargs(ClusterSpec(kind=kind, config_file=str(WORKFLOWS / "jobqueue-gpu.yaml")))
        assert gpu["processes"] == 1 and gpu["job_extra_directives"] == ["--gres=gpu:1"]


def test_missing_submit_command_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="'qsub' is not on PATH"):
        open_runner(ClusterSpec(kind="pbs", memory="4GB"), lazy=True)


# -- scheduler address, lazy start -----------------------------------------------------------------


def _square(x: int) -> int:
    return x * x


def test_existing_scheduler_address(caplog: pytest.LogCaptureFixture) -> None:
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        with caplog.at_level("INFO", logger="histoseg"):
            runner = open_runner(ClusterSpec(scheduler=cluster.scheduler_address, worker_timeout=20))
        try:
            assert sorted(runner.imap_unordered(_square, [1, 2, 3])) == [(0, 1), (1, 4), (2, 9)]
        finally:
            runner.close()
        assert "dask dashboard: http" in caplog.text


def test_unreachable_scheduler_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cannot connect"):
        open_runner(ClusterSpec(scheduler="tcp://127.0.0.1:9", worker_timeout=2))


def test_lazy_runner_starts_once_at_first_task_and_remembers_failure() -> None:
    calls: list[int] = []

    def broken() -> LazyRunner:
        calls.append(1)
        raise HistosegError("no workers")

    lazy = LazyRunner(broken)  # type: ignore[arg-type]
    assert calls == []  # nothing starts before the first task
    for _ in range(2):
        with pytest.raises(HistosegError, match="no workers"):
            lazy.imap_unordered(_square, [1])
    assert calls == [1]  # the failure is remembered, not retried
    closed = LazyRunner(broken)  # type: ignore[arg-type]
    closed.close()  # closing an unstarted runner starts nothing, and nothing starts after it
    with pytest.raises(HistosegError, match="closed"):
        closed.imap_unordered(_square, [1])
    assert calls == [1]
