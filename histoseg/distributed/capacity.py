"""How many local worker processes this machine can hold: what ``histoseg segment --workers auto`` (the default)
starts.

One single-threaded worker per usable core (Dask's count: the CPU affinity mask, e.g. ``taskset`` or a SLURM
job's cpuset, and a cgroup CPU quota, e.g. a container's ``--cpus``), as many as the available memory holds at
``WORKER_MEMORY`` each. One worker runs in this process (no cluster to start); more are a local Dask cluster.
Measured on a 2-core AMD EPYC (AVX2 only), 10000² real-tissue slide, region size 1024: 1 worker 0.29 MP/s, 2
workers 0.42-0.46 MP/s (``benchmarks/throughput.py``). Workers that share one GPU (``--device cuda`` without
``--gpus``) each hold a CUDA context and the network's buffers there: as many as its free memory holds at
``GPU_WORKER_MEMORY`` each.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from histoseg.config import MAX_WORKERS

log = logging.getLogger("histoseg")

WORKER_MEMORY = 1536 * 2**20
"""Bytes of memory set aside per worker process at the default region size: a worker's measured peak is
~1.1 GB (1024-px regions, the default int8 engine; 2 workers and their client peaked at 2.7 GB on the 10000²
slide), plus room for the client, which holds the slide's stitched outputs."""

GPU_WORKER_MEMORY = 2 * 2**30
"""Bytes of GPU memory set aside per worker process that shares a GPU: measured 28.4 GB for 16 workers (1.8 GB
each: the CUDA context and bf16 PyTorch at the default 1024-px regions) on an NVIDIA H200, 20000² slide."""

SMALL_SLIDE_INPUT = 4_000_000
"""Under ``--workers auto``, a batch of one slide whose regions to compute give the network fewer input pixels than
this (their read boxes: tissue boxes plus halo, :func:`histoseg.tiling.network_input`) runs them in this process:
starting worker processes (each imports the runtime and loads the network) costs about what a second core saves
there. A pixel count, not a region count: regions of 2048 px carry 3x the work of regions of 1024, and the regions
of a slide's edge or sparse tissue a fraction of it. Measured on a 2-core first-generation AMD EPYC (Zen 1, AVX2
only), default settings, in this process against 2 workers, whole command: CMU-1-Small-Region at region size 1024 (8
regions, 10.9 MP of network input) 60.6 against 44.7 s; at 2048 (4 regions, 8.6 MP) 49.3 against 43.5 s; a 2048²
demo slide (4 regions, 7.2 MP) 45.2 against 35.9 s; so the break-even lies near 3-4 MP there (about 4.6 s a
megapixel in one process, ~7.5 s to start the workers). On an earlier 2-core AVX2 EPYC (a faster network) one 500²
region ran in 8.2 s against 11.8 and nine regions broke even (20.8 against 21.0 s), which the previous rule, fewer
than 12 regions, was set from: it kept the 8 regions of 1024 px above in one process, 1.36x slower."""


@dataclass(frozen=True)
class Capacity:
    """What this machine offers local workers, and the worker count taken from it."""

    cores: int  # usable cores
    memory: int | None  # bytes available now (None: unknown)
    gpu_memory: int | None = None  # free bytes of the GPU the workers share (None: they run on the CPU)

    @property
    def workers(self) -> int:
        """One per core, at most as many as the memory (and a shared GPU's memory) holds (at least one, at most
        ``MAX_WORKERS``)."""
        by_memory = self.cores if self.memory is None else self.memory // WORKER_MEMORY
        by_gpu = self.cores if self.gpu_memory is None else self.gpu_memory // GPU_WORKER_MEMORY
        return max(1, min(self.cores, by_memory, by_gpu, MAX_WORKERS))

    def describe(self) -> str:
        mem = "memory unknown" if self.memory is None else f"{self.memory / 2**30:.1f} GiB available"
        gpu = "" if self.gpu_memory is None else f", {self.gpu_memory / 2**30:.1f} GiB free on the shared GPU"
        return f"{self.workers} worker(s): {self.cores} usable core(s), {mem}{gpu}"


def usable_cores() -> int:
    """Cores this process may use: the host's, limited by the affinity mask and a cgroup CPU quota."""
    from dask.system import cpu_count

    return max(1, int(cpu_count()))


def available_memory() -> int | None:
    """Bytes of memory available now: the host's available memory, limited by a cgroup or rlimit memory limit
    (Dask's reading of it); ``None`` when it cannot be read."""
    try:
        import psutil
        from distributed.system import MEMORY_LIMIT
    except ImportError:  # psutil comes with distributed; without them nothing bounds the count but the cores
        return None
    return int(min(psutil.virtual_memory().available, MEMORY_LIMIT))


def gpu_free_memory(device: str) -> int | None:
    """Free bytes of ``device`` when it is a CUDA device this machine has (``cuda`` or ``cuda:N``), else None."""
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None  # the segment run refuses the device with its own message
    index = int(device.partition(":")[2] or torch.cuda.current_device())
    if index >= torch.cuda.device_count():
        return None
    free, _total = torch.cuda.mem_get_info(index)
    return int(free)


def machine_capacity(device: str = "cpu") -> Capacity:
    """This machine's capacity for workers that run the network on ``device``, read now."""
    return Capacity(usable_cores(), available_memory(), gpu_free_memory(device))


def auto_workers(device: str = "cpu") -> int:
    """The ``--workers auto`` count on this machine for workers on ``device`` (logged with its reasons)."""
    cap = machine_capacity(device)
    log.info("--workers auto: %s", cap.describe())
    return cap.workers


__all__ = [
    "GPU_WORKER_MEMORY",
    "SMALL_SLIDE_INPUT",
    "WORKER_MEMORY",
    "Capacity",
    "auto_workers",
    "available_memory",
    "gpu_free_memory",
    "machine_capacity",
    "usable_cores",
]
