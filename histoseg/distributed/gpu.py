"""One Dask worker process per GPU, each pinned to its own device (``--cluster local --gpus all|0,1``).

Each worker sees exactly one device through ``CUDA_VISIBLE_DEVICES``, so region tasks run with
``device="cuda"`` and never share a GPU. dask-cuda's ``LocalCUDACluster`` is used when it is installed
(it also places workers near their GPU's CPUs and NICs); otherwise a plain Dask ``SpecCluster`` with one
worker spec per device does the pinning. GPU indices in ``--gpus`` count the devices visible to this
process, so ``--gpus 0,1`` under ``CUDA_VISIBLE_DEVICES=4,5`` uses physical GPUs 4 and 5.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

from histoseg.distributed.cluster import parse_gpu_request
from histoseg.distributed.runner import SINGLE_THREAD_ENV, DaskRunner, log_dashboard
from histoseg.errors import ConfigError

log = logging.getLogger(__name__)


def visible_gpu_count() -> int:
    """CUDA devices torch can use here (0 with a CPU build of torch or without a driver)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return int(torch.cuda.device_count())


def resolve_gpus(request: str, count: int | None = None, visible: str | None = None) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` value of each worker, one per requested GPU.

    ``count`` (default: ``torch.cuda.device_count()``) and ``visible`` (default: this process's
    ``CUDA_VISIBLE_DEVICES``) are parameters so the mapping is testable without a GPU.
    """
    ids = parse_gpu_request(request)
    n = visible_gpu_count() if count is None else count
    if n < 1:
        raise ConfigError(
            f"--gpus {request}: no CUDA GPU is visible on this machine (torch.cuda.device_count() is 0: a CPU "
            "build of torch, no driver, or CUDA_VISIBLE_DEVICES hides them); run without --gpus, e.g. --workers N"
        )
    wanted = list(range(n)) if ids is None else ids
    missing = [i for i in wanted if i >= n]
    if missing:
        raise ConfigError(f"--gpus {request}: GPU index {missing[0]} does not exist (visible GPUs: 0..{n - 1})")
    env = os.environ.get("CUDA_VISIBLE_DEVICES", "") if visible is None else visible
    names = [part.strip() for part in env.split(",") if part.strip()]
    if len(names) < n:
        names = [str(i) for i in range(n)]
    return [names[i] for i in wanted]


def gpu_worker_specs(devices: list[str], memory_limit: int | None = None) -> dict[str, dict[str, Any]]:
    """``SpecCluster`` worker specs: one single-threaded Nanny per device, pinned by its environment."""
    from distributed import Nanny
    from distributed.system import MEMORY_LIMIT

    per_worker = memory_limit if memory_limit is not None else MEMORY_LIMIT // max(1, len(devices))
    return {
        f"gpu-{device}": {
            "cls": Nanny,
            "options": {
                "nthreads": 1,
                "host": "127.0.0.1",
                "memory_limit": per_worker,
                "env": {**SINGLE_THREAD_ENV, "CUDA_VISIBLE_DEVICES": device},
                "resources": {"GPU": 1},
            },
        }
        for device in devices
    }


def gpu_runner(devices: list[str], use_dask_cuda: bool | None = None) -> DaskRunner:
    """Start one worker per device; ``use_dask_cuda=None`` picks dask-cuda when it is importable."""
    from distributed import Client

    if not devices:
        raise ConfigError("--gpus selected no GPU")
    if use_dask_cuda is None:
        use_dask_cuda = importlib.util.find_spec("dask_cuda") is not None
    cluster: Any
    if use_dask_cuda:
        from dask_cuda import LocalCUDACluster

        cluster = LocalCUDACluster(
            CUDA_VISIBLE_DEVICES=",".join(devices),
            n_workers=len(devices),
            threads_per_worker=1,
            dashboard_address=":0",
        )
    else:
        from distributed import Scheduler, SpecCluster

        cluster = SpecCluster(
            workers=gpu_worker_specs(devices),
            scheduler={"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}},
            name="histoseg-gpus",
        )
    client = Client(cluster)
    log.info(
        "one Dask worker per GPU (CUDA_VISIBLE_DEVICES %s)%s", ", ".join(devices), " via dask-cuda" * use_dask_cuda
    )
    log_dashboard(client)
    return DaskRunner(client, cluster)
