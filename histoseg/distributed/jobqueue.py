"""Dask workers as batch jobs on SLURM, PBS or LSF, through dask-jobqueue (``--cluster slurm|pbs|lsf``).

Settings come, highest priority first, from the command-line flags, the ``--cluster-config`` file, the
user's Dask configuration (``~/.config/dask/jobqueue.yaml``) and histoseg's defaults. The file uses
dask-jobqueue's own format, so an existing site file works unchanged::

    jobqueue:
      slurm:
        cores: 4
        memory: 16GB
        walltime: "02:00:00"
        job-extra-directives: ["--gres=gpu:1"]

Every job runs ``processes`` workers with one thread each (default: one worker per core): two busy
threads per process ran slower than one (facts.md). Job scripts export single-threaded math settings.
"""

from __future__ import annotations

import inspect
import logging
import shutil
from pathlib import Path
from typing import Any

from histoseg.distributed.cluster import ClusterSpec, wait_for_first_worker
from histoseg.distributed.runner import DaskRunner, log_dashboard, worker_env, worker_tunables
from histoseg.errors import ConfigError

log = logging.getLogger(__name__)

CLASSES = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "lsf": "LSFCluster"}
SUBMIT_COMMANDS = {"slurm": "sbatch", "pbs": "qsub", "lsf": "bsub"}
# set by histoseg itself: never taken from a file
_INTERNAL = {"self", "scheduler", "config_name", "loop", "asynchronous", "job_cls", "n_workers", "security"}


def _cluster_class(kind: str) -> Any:
    try:
        import dask_jobqueue
    except ImportError as exc:
        raise ConfigError(f"--cluster {kind} needs dask-jobqueue: pip install dask-jobqueue") from exc
    return getattr(dask_jobqueue, CLASSES[kind])


def allowed_keys(cls: Any) -> set[str]:
    """Keyword arguments the installed dask-jobqueue accepts for ``cls`` (cluster and job parameters)."""
    from dask_jobqueue.core import Job, JobQueueCluster

    keys: set[str] = set()
    for fn in (cls.job_cls.__init__, Job.__init__, JobQueueCluster.__init__):
        for p in inspect.signature(fn).parameters.values():
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                keys.add(p.name)
    return keys - _INTERNAL


def load_cluster_config(path: str | Path, kind: str) -> dict[str, Any]:
    """The ``jobqueue.<kind>`` section of a dask-jobqueue YAML file, keys with ``_``, null values dropped."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read --cluster-config {p}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"--cluster-config {p} is not valid YAML: {exc}") from exc
    queues = data.get("jobqueue") if isinstance(data, dict) else None
    if not isinstance(queues, dict):
        raise ConfigError(f"--cluster-config {p}: expected a top-level 'jobqueue:' mapping (dask-jobqueue format)")
    section = queues.get(kind)
    if section is None:
        raise ConfigError(f"--cluster-config {p} has no 'jobqueue: {kind}:' section (found: {', '.join(queues)})")
    if not isinstance(section, dict):
        raise ConfigError(f"--cluster-config {p}: 'jobqueue: {kind}:' must be a mapping")
    return {str(k).replace("-", "_"): v for k, v in section.items() if v is not None}


def _dask_config(kind: str, key: str) -> Any:
    import dask.config

    return dask.config.get(f"jobqueue.{kind}.{key.replace('_', '-')}", default=None)


def cluster_kwargs(spec: ClusterSpec, default_log_directory: str | Path | None = None) -> dict[str, Any]:
    """The keyword arguments for the dask-jobqueue cluster class (flags > file > Dask config > defaults)."""
    cls = _cluster_class(spec.kind)
    kw = load_cluster_config(spec.config_file, spec.kind) if spec.config_file else {}
    unknown = sorted(set(kw) - allowed_keys(cls))
    if unknown:
        raise ConfigError(
            f"--cluster-config {spec.config_file}: unknown key(s) {', '.join(unknown)} for {CLASSES[spec.kind]} "
            f"(known: {', '.join(sorted(k.replace('_', '-') for k in allowed_keys(cls)))})"
        )
    account_key = "project" if spec.kind == "lsf" else "account"
    flags: dict[str, Any] = {
        "cores": spec.cores,
        "memory": spec.memory,
        "walltime": spec.walltime,
        account_key: spec.account,
        "queue": spec.queue,
        "interface": spec.interface,
        "log_directory": spec.log_directory,
    }
    kw.update({k: v for k, v in flags.items() if v is not None})
    for key in ("cores", "memory", "processes", "log_directory"):
        if key not in kw and _dask_config(spec.kind, key) is not None:
            kw[key] = _dask_config(spec.kind, key)
    kw.setdefault("cores", 1)
    if "memory" not in kw:
        raise ConfigError(
            f"--cluster {spec.kind} needs the memory of each job: pass --memory (e.g. 8GB) or set "
            f"'memory:' under 'jobqueue: {spec.kind}:' in --cluster-config"
        )
    kw.setdefault("processes", kw["cores"])  # one single-threaded worker per core
    if default_log_directory is not None:
        kw.setdefault("log_directory", str(default_log_directory))
    extra = list(_as_list(kw.get("job_extra_directives"), "job-extra-directives")) + list(spec.job_extra)
    if extra:
        kw["job_extra_directives"] = extra
    exports = [f"export {k}={v}" for k, v in worker_env().items()]  # one thread; oneDNN's kernel cache
    # job workers log to their own files (OUT/_cluster_logs): keep Dask's INFO there even when the submitting
    # CLI quietened its own terminal through the environment (which batch systems pass on to the jobs)
    exports.append("export DASK_LOGGING__DISTRIBUTED=info")
    if tunables := worker_tunables():  # the allocator's settings of local workers (huge pages, thresholds)
        exports.append(f"export GLIBC_TUNABLES={tunables}")
    kw["job_script_prologue"] = exports + list(_as_list(kw.get("job_script_prologue"), "job-script-prologue"))
    return kw


def _as_list(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ConfigError(f"--cluster-config: {key} must be a list of strings, got {value!r}")
    return [str(v) for v in value]


def make_jobqueue_cluster(spec: ClusterSpec, default_log_directory: str | Path | None = None) -> Any:
    """The dask-jobqueue cluster object, not yet scaled (``job_script()`` shows what would be submitted)."""
    return _build(spec, cluster_kwargs(spec, default_log_directory))


def _build(spec: ClusterSpec, kw: dict[str, Any]) -> Any:
    if kw.get("log_directory"):
        Path(kw["log_directory"]).mkdir(parents=True, exist_ok=True)
    try:
        return _cluster_class(spec.kind)(**kw)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"bad --cluster {spec.kind} settings: {exc}") from exc


def check_submit_host(kind: str) -> None:
    """The queue's submit command must be on PATH, or no job can start."""
    submit = SUBMIT_COMMANDS[kind]
    if shutil.which(submit) is None:
        raise ConfigError(f"--cluster {kind}: {submit!r} is not on PATH (run this on a {kind} submit host)")


def jobqueue_runner(spec: ClusterSpec, kwargs: dict[str, Any] | None = None) -> DaskRunner:
    """Submit ``spec.jobs`` worker jobs and return once the first worker has joined.

    ``kwargs``: from ``cluster_kwargs`` (computed from ``spec`` when omitted).
    """
    from distributed import Client

    check_submit_host(spec.kind)
    kw = kwargs if kwargs is not None else cluster_kwargs(spec)
    cluster = _build(spec, kw)
    log.debug("job script:\n%s", cluster.job_script())
    try:
        cluster.scale(jobs=spec.jobs)
        client = Client(cluster)
    except Exception:
        cluster.close()
        raise
    logs = kw.get("log_directory") or "the submit directory"
    log.info(
        "%s: %d job(s) of %s core(s), %s submitted; worker logs in %s",
        spec.kind,
        spec.jobs,
        kw["cores"],
        kw["memory"],
        logs,
    )
    log_dashboard(client)
    where = f"the {spec.kind} jobs (check the queue, e.g. squeue, qstat or bjobs, and the logs in {logs})"
    wait_for_first_worker(client, spec.worker_timeout, where, cluster)
    return DaskRunner(client, cluster)
