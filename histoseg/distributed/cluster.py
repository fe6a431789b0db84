"""Where tasks run: one ``ClusterSpec`` in, a ``TaskRunner`` out.

Four places, one interface (design.md section 8):

- ``local`` (default): ``workers`` single-threaded processes on this machine; 1 runs in-process.
- ``local`` with ``gpus``: one worker process per GPU, each pinned to its device (``gpu.py``).
- ``slurm`` / ``pbs`` / ``lsf``: Dask workers started as batch jobs by dask-jobqueue (``jobqueue.py``),
  ``jobs`` of them, sized from flags and/or a dask-jobqueue YAML file.
- ``scheduler``: an address of a Dask scheduler someone already runs (``tcp://host:8786``).

The spec is plain data, checked when built, so a bad combination fails before any job is submitted.
It is not part of ``SegmentConfig``: where the work runs never changes the outputs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histoseg.config import CLUSTER_KINDS, LOCAL_CLUSTER, ClusterKind
from histoseg.config import check_device as check_device_setting
from histoseg.distributed.lazy import LazyRunner
from histoseg.distributed.runner import DaskRunner, TaskRunner, log_dashboard, make_runner
from histoseg.errors import ConfigError, HistosegError

log = logging.getLogger(__name__)

JOBQUEUE_KINDS: tuple[ClusterKind, ...] = tuple(k for k in CLUSTER_KINDS if k != LOCAL_CLUSTER)


@dataclass(frozen=True)
class ClusterSpec:
    """Settings of the Dask cluster that runs region tasks (``histoseg segment --cluster ...``).

    Job-queue fields left ``None`` come from ``config_file`` (dask-jobqueue's YAML format), then from the
    user's Dask configuration (``~/.config/dask/jobqueue.yaml``), then from histoseg's defaults
    (one core per job, one single-threaded worker per core).
    """

    kind: ClusterKind = LOCAL_CLUSTER
    workers: int = 1
    gpus: str | None = None  # "all" or "0,1" (indices into the visible devices)
    scheduler: str | None = None  # address of a running Dask scheduler
    jobs: int = 1
    config_file: str | None = None
    cores: int | None = None
    memory: str | None = None
    walltime: str | None = None
    account: str | None = None
    queue: str | None = None
    job_extra: tuple[str, ...] = ()
    interface: str | None = None
    log_directory: str | None = None
    worker_timeout: float = 600.0  # seconds to wait for the first worker of a job queue or scheduler
    auto: bool = False  # ``workers`` came from ``--workers auto``: a lone small slide may run in this process

    def __post_init__(self) -> None:
        if self.kind not in CLUSTER_KINDS:
            raise ConfigError(f"unknown --cluster {self.kind!r}; choose from {', '.join(CLUSTER_KINDS)}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {self.jobs}")
        if self.cores is not None and self.cores < 1:
            raise ConfigError(f"--cores must be >= 1, got {self.cores}")
        if not self.worker_timeout > 0:
            raise ConfigError(f"--worker-timeout must be positive, got {self.worker_timeout}")
        if self.memory is not None:
            _check_memory(self.memory)
        if self.gpus is not None:
            parse_gpu_request(self.gpus)
        if self.scheduler is not None:
            if self.kind != LOCAL_CLUSTER:
                raise ConfigError(f"--scheduler connects to a running cluster: drop --cluster {self.kind}")
            if self.gpus is not None:
                raise ConfigError("--gpus starts local GPU workers: it cannot be combined with --scheduler")
        if self.gpus is not None and self.kind != LOCAL_CLUSTER:
            raise ConfigError(
                f"--gpus is for --cluster local; for GPU jobs on {self.kind} ask the queue for them, "
                "e.g. --job-extra=--gres=gpu:1 (SLURM), and pass --device cuda"
            )
        if self.gpus is not None and self.workers != 1:
            raise ConfigError("--gpus starts one worker per GPU: drop --workers")
        if self.kind == LOCAL_CLUSTER:
            given = [flag for flag, value in self._jobqueue_flags().items() if value]
            if given:
                raise ConfigError(
                    f"{', '.join(given)} only apply to a job queue (--cluster {'|'.join(JOBQUEUE_KINDS)})"
                )
        elif self.workers != 1:
            raise ConfigError(f"--workers is for --cluster local; with --cluster {self.kind} use --jobs and --cores")

    def _jobqueue_flags(self) -> dict[str, object]:
        return {
            "--jobs": self.jobs != 1,
            "--cluster-config": self.config_file,
            "--cores": self.cores,
            "--memory": self.memory,
            "--walltime": self.walltime,
            "--account": self.account,
            "--queue": self.queue,
            "--job-extra": self.job_extra,
            "--interface": self.interface,
        }

    @property
    def uses_gpus(self) -> bool:
        return self.gpus is not None

    def check_device(self, device: str, runs_here: bool = True) -> None:
        """``--gpus`` pins each worker to one device, which it sees as ``cuda``: other devices are errors. Where
        this spec's workers run on this machine (a local cluster, no ``--scheduler``; ``runs_here``: the caller
        did not bring its own runner), the device must exist here too; a job queue's or a scheduler's workers
        may have GPUs that this machine lacks."""
        if self.uses_gpus and device != "cuda":
            raise ConfigError(
                f"--gpus runs one worker per GPU, each seeing its own GPU as 'cuda'; got --device {device} "
                "(leave --device out or pass --device cuda)"
            )
        check_device_setting(device, here=runs_here and is_local_processes(self))


def parse_gpu_request(request: str) -> list[int] | None:
    """``"all"`` -> None (every visible GPU); ``"0,1"`` -> [0, 1]; anything else is a ConfigError."""
    text = request.strip().lower()
    if text == "all":
        return None
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        ids = []
    if not ids or any(i < 0 for i in ids):
        raise ConfigError(f"--gpus must be 'all' or a comma list of GPU indices like 0,1; got {request!r}")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"--gpus lists a GPU twice: {request!r}")
    return ids


def _check_memory(text: str) -> None:
    from dask.utils import parse_bytes

    try:
        ok = parse_bytes(text) > 0
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise ConfigError(f"--memory must be a size like 16GB or 4000MB, got {text!r}")


def open_runner(
    spec: ClusterSpec,
    default_log_directory: str | Path | None = None,
    *,
    lazy: bool = False,
    small_below: float = 0,
    size: Callable[[Sequence[Any]], float] = len,
) -> TaskRunner:
    """Start (or connect to) the cluster described by ``spec``; the caller closes the runner.

    Settings are checked at once (missing GPUs, ``sbatch`` not on PATH, a bad config file), but with
    ``lazy=True`` nothing starts before the first task: a batch whose slides are all done submits no job.
    ``default_log_directory``: where job-queue workers write their logs when neither a flag nor the
    config file says (the batch uses ``OUT/_cluster_logs``). ``small_below`` (lazy, local worker processes
    only): a first request whose work, ``size(items)`` (default: the number of tasks), is below it runs in this
    process instead of starting the workers.
    """
    start = runner_factory(spec, default_log_directory)
    if not lazy:
        return start()
    if small_below > 0 and is_local_processes(spec) and spec.workers > 1:
        return LazyRunner(start, small=lambda: make_runner(1), small_below=small_below, size=size)
    return LazyRunner(start, ahead=not (is_local_processes(spec) and spec.workers <= 1))  # in-process: no prestart


def is_local_processes(spec: ClusterSpec) -> bool:
    """Whether ``spec`` runs local CPU worker processes (no scheduler, job queue or GPUs)."""
    return spec.scheduler is None and spec.kind == LOCAL_CLUSTER and spec.gpus is None


def runner_factory(spec: ClusterSpec, default_log_directory: str | Path | None = None) -> Callable[[], TaskRunner]:
    """Check ``spec`` against this machine now; return the function that starts the runner."""
    if spec.scheduler is not None:
        address = spec.scheduler
        return lambda: scheduler_runner(address, spec.worker_timeout)
    if spec.kind in JOBQUEUE_KINDS:
        from histoseg.distributed.jobqueue import check_submit_host, cluster_kwargs, jobqueue_runner

        check_submit_host(spec.kind)
        kwargs = cluster_kwargs(spec, default_log_directory)
        return lambda: jobqueue_runner(spec, kwargs)
    if spec.gpus is not None:
        from histoseg.distributed.gpu import gpu_runner, resolve_gpus

        devices = resolve_gpus(spec.gpus)
        return lambda: gpu_runner(devices)
    workers = spec.workers
    return lambda: make_runner(workers)


def scheduler_runner(address: str, timeout: float = 600.0) -> DaskRunner:
    """Connect to a running Dask scheduler and wait (up to ``timeout`` s) for its first worker."""
    from distributed import Client

    try:
        client = Client(address, timeout=min(timeout, 30.0))
    except (OSError, TimeoutError, ValueError) as exc:
        raise ConfigError(f"cannot connect to the Dask scheduler at {address!r}: {exc}") from exc
    log_dashboard(client)
    wait_for_first_worker(client, timeout, f"the scheduler at {address}")
    return DaskRunner(client)


def wait_for_first_worker(client: Any, timeout: float, where: str, cluster: Any | None = None) -> None:
    """Block until one worker is connected; on timeout close ``client`` (and ``cluster``) and raise."""
    try:
        client.wait_for_workers(1, timeout=timeout)
    except (TimeoutError, asyncio.TimeoutError) as exc:
        client.close()
        if cluster is not None:
            cluster.close()
        raise HistosegError(f"no Dask worker joined {where} within {timeout:g} s (--worker-timeout)") from exc
