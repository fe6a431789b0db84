"""Generic task runners: in-process, or a Dask distributed cluster (knows Dask, not nuclei).

``LocalDaskRunner`` starts worker *processes* with one thread each and single-threaded math libraries:
two busy threads per process ran slower than one on small shared machines (docs/facts.md). Results come
back as tasks complete (``as_completed``), each with its item's index: callers that need determinism order
by that index (stitching orders regions by raster position), never by arrival.
``--workers 1`` runs tasks in this process with ``HISTOSEG_THREADS`` math threads (default 1).

The in-process runner and the Dask workers set glibc's allocator thresholds (:data:`ALLOCATOR_THRESHOLD`): a
region's arrays are allocated and freed again for every region, and with glibc's defaults most of them were mapped
and zeroed by the kernel afresh each time (~24 s of system time on a 10000² slide). The results do not change:
only where the bytes live.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from histoseg.errors import ConfigError

log = logging.getLogger(__name__)

SINGLE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}


class TaskRunner(Protocol):
    """Runs ``fn(item, *args)`` for each item; yields ``(index, result)`` as tasks complete."""

    def imap_unordered(self, fn: Callable[..., Any], items: Sequence[Any], *args: Any) -> Iterator[tuple[int, Any]]: ...

    def close(self) -> None: ...

    @property
    def n_workers(self) -> int: ...


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_DEFAULT_THRESHOLD = 128 * 1024  # glibc's default mmap and trim thresholds (mallopt(3))
KEEP_MEMORY_ENV = "HISTOSEG_KEEP_MEMORY"  # "0" leaves the allocator at its defaults
TRIM_EVERY = 8  # the in-process runner and a Dask client return the heap's free memory after this many results
ALLOCATOR_THRESHOLD = 8 << 20
"""glibc's mmap and trim thresholds (bytes) in a process that runs regions: blocks below are kept in the heap for
the next region, blocks above are mapped and handed back at once. Measured on an AMD EPYC (AVX2, 2 cores), int8,
10000² slide: two Dask workers, system time 23.8 -> 13.3 s, wall 94.0 -> 88.3 s, peak RSS of all processes 2.67
-> 2.68 GB (16 MiB: 2.86 GB, 32 MiB: 3.07 GB; issue 13's budget is 3 GB); one worker in process, against the
earlier setting there (mmap off, all freed memory kept, handed back after every region; ``benchmarks/throughput.py``
against the previous commit): wall 171.1 -> 149.6 s, system time 25.2 -> 10.9 s, peak 1.97 -> 1.49 GB;
CMU-1-Small-Region with PyTorch: 35.7 -> 34.3 s, peak 2.46 -> 1.41 GB (the large activations no longer stay
resident until the hand-back)."""


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds of this process to :data:`ALLOCATOR_THRESHOLD` (True when applied).

    For the in-process runner: its regions' arrays below the threshold are reused by the next region instead of
    mapped afresh. No effect outside glibc (e.g. macOS, musl) or with ``HISTOSEG_KEEP_MEMORY=0``."""
    mallopt = None if os.environ.get(KEEP_MEMORY_ENV, "1") == "0" else _glibc("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        return False
    return all(bool(mallopt(option, ALLOCATOR_THRESHOLD)) for option in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD))


def _glibc(name: str, *argtypes: Any) -> Any:
    """glibc's allocator function ``name`` with its argument types, or None outside glibc."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):  # pragma: no cover - glibc always has mallopt and malloc_trim
        return None
    fn.argtypes = list(argtypes)
    return fn


def restore_allocator_defaults() -> None:
    """Put glibc's documented default thresholds back (128 KiB; the mmap threshold no longer adapts, as it does
    in a process that never set it) and hand the kept memory back, so a library caller's process is left as
    found as far as glibc allows."""
    mallopt = _glibc("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        return
    mallopt(_M_MMAP_THRESHOLD, _DEFAULT_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, _DEFAULT_THRESHOLD)
    release_freed_memory()


WORKER_TUNABLES: dict[str, str] = {
    "glibc.malloc.hugetlb": "1",
    "glibc.malloc.mmap_threshold": str(ALLOCATOR_THRESHOLD),
    "glibc.malloc.trim_threshold": str(ALLOCATOR_THRESHOLD),
}
"""glibc tunables of a worker process, by name (see :func:`worker_tunables`)."""


def worker_tunables(environ: dict[str, str] | None = None) -> str | None:
    """The ``GLIBC_TUNABLES`` value a worker process starts with: the environment's own tunables, plus each of
    :data:`WORKER_TUNABLES` that they do not set themselves (theirs stand); None with ``HISTOSEG_KEEP_MEMORY=0``
    (the allocator's defaults). Tunables are read when a process starts, so this is for worker processes (the
    nanny sets it before it starts one; job scripts export it), not the running one. The results do not change:
    only where the bytes live.

    ``glibc.malloc.hugetlb=1`` (glibc 2.35+; older ones and other C libraries ignore it): a worker's OpenVINO
    engine allocates its working buffers afresh whenever the input shape changes
    (:mod:`histoseg.inference.openvino_engine`), ~0.65 GB in fp32, and glibc maps them page by page; 4 KiB pages
    cost ~17 s of system time on a 10000² slide. With this tunable glibc asks for 2 MiB pages for those mappings
    (``madvise``), which the kernel grants where transparent huge pages are ``always`` or ``madvise``.

    ``mmap_threshold`` and ``trim_threshold``: :data:`ALLOCATOR_THRESHOLD` (see there), as the in-process runner
    sets them at run time; a worker's task thread allocates from a non-main arena, which glibc's defaults handed
    back to the kernel soon after each region."""
    env = os.environ if environ is None else environ
    if env.get(KEEP_MEMORY_ENV, "1") == "0":
        return None
    own = env.get("GLIBC_TUNABLES", "")
    theirs = {item.split("=", 1)[0] for item in own.split(":") if item}
    add = [f"{k}={v}" for k, v in WORKER_TUNABLES.items() if k not in theirs]
    return ":".join([own, *add] if own else add) or None


WORKER_ENV: dict[str, str] = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "512"}
"""Environment of a CPU worker process for its memory (see :func:`worker_env`).

``ONEDNN_PRIMITIVE_CACHE_CAPACITY``: oneDNN, the convolution library inside OpenVINO's CPU plugin, keeps the kernels
it generated for each input shape in a cache of 1024 by default; with the one dynamic compilation (bf16, and int8
where bf16 is native) and a new region shape at most regions, a worker's memory grew with every distinct shape it
met. Measured on a 2-core Intel Xeon (AVX-512, AMX), bf16, the default network on 150 regions of one worker's share
of the 20000² benchmark slide (real shapes, in order), one process: 1024 (oneDNN's default) 36.7-37.0 s and 0.99 GB
peak; 512 37.0-37.2 s, 0.86 GB; 256 38.2-38.5 s, 0.80 GB; 128 38.3-39.2 s, 0.76 GB. End to end, 20000² slide, 2
workers: peak of all processes 3.16-3.22 -> 2.91 GB (512; 2.80 GB with 256 at 5% more wall time). The outputs
do not depend on it (the same kernels, generated again when evicted)."""


def worker_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """What a CPU worker process's environment adds to the caller's: one math thread (:data:`SINGLE_THREAD_ENV`)
    and :data:`WORKER_ENV`, each memory setting only where the caller's environment does not set it (theirs
    stand) and not with ``HISTOSEG_KEEP_MEMORY=0`` (the libraries' defaults)."""
    env = os.environ if environ is None else environ
    memory = {} if env.get(KEEP_MEMORY_ENV, "1") == "0" else {k: v for k, v in WORKER_ENV.items() if k not in env}
    return {**SINGLE_THREAD_ENV, **memory}


def release_freed_memory() -> None:
    """Give the heap's free memory back to the kernel now (glibc ``malloc_trim``; a no-op elsewhere).

    Called when a slide's regions are done: the buffers kept for the next region are not needed while the
    client stitches and exports the slide's last bands and closes its outputs, and would otherwise add to
    that stage's peak."""
    trim = _glibc("malloc_trim", ctypes.c_size_t)
    if trim is not None:
        trim(0)


class InProcessRunner:
    """Runs tasks one after another in this process (``--workers 1``, the default), with glibc's thresholds at
    :data:`ALLOCATOR_THRESHOLD` (:func:`keep_freed_memory`; ``close()`` puts the defaults back), handing the heap's
    free memory back to the kernel every :data:`TRIM_EVERY` tasks.

    Why the periodic hand-back: a caller without a region store (``run_regions_table``) keeps every result in this
    process until the slide is stitched, so small long-lived allocations land between the blocks each task frees,
    which glibc could neither reuse nor return (measured earlier, with freed memory kept and no hand-back: ~60 MB a
    region, 7.1 GB on a 10k² slide). Handing it back after every task, as this runner did before, re-faulted the
    next region's arrays each time (11% of the CPU time on a 10k² slide, AMD EPYC)."""

    n_workers = 1

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads
        _limit_threads(threads)
        self._kept = keep_freed_memory()  # undone by close(): the process is the caller's, not ours

    def imap_unordered(self, fn: Callable[..., Any], items: Sequence[Any], *args: Any) -> Iterator[tuple[int, Any]]:
        for i, item in enumerate(items):
            result = fn(item, *args)
            if (i + 1) % TRIM_EVERY == 0:
                release_freed_memory()  # see the class docstring
            yield i, result

    def close(self) -> None:
        if self._kept:
            restore_allocator_defaults()
            self._kept = False

    def __enter__(self) -> InProcessRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _limit_threads(n: int, load_torch: bool = True) -> None:
    """``n`` math threads for torch and OpenCV; with ``load_torch=False`` torch is set only if it is already
    loaded (a Dask worker that runs an exported engine never imports it: ~190 MB a process; if it loads torch
    later, torch reads ``OMP_NUM_THREADS``)."""
    try:
        if load_torch:
            import torch
        else:
            torch = sys.modules.get("torch")  # type: ignore[assignment]
        if torch is not None:
            torch.set_num_threads(n)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        import cv2

        cv2.setNumThreads(n)
    except ImportError:  # pragma: no cover
        pass


def limit_worker_threads() -> None:
    """Single-threaded math in a Dask worker process (run by ``plugins.SingleThreadPlugin``)."""
    for key, value in SINGLE_THREAD_ENV.items():
        os.environ.setdefault(key, value)
    # forced, as torch.set_num_threads(1) was: an exported engine takes its thread count from it
    # (inference.runtime.math_threads) when torch is not loaded, whatever the job's environment says
    os.environ["OMP_NUM_THREADS"] = "1"
    _limit_threads(1, load_torch=False)


class DaskRunner:
    """Runs tasks on a Dask distributed client (local processes, a job-queue cluster, or an address)."""

    def __init__(
        self,
        client: Any,
        cluster: Any | None = None,
        retries: int = 2,
        restore_env: dict[str, str | None] | None = None,
    ) -> None:
        from histoseg.distributed.plugins import SingleThreadPlugin

        self.client = client
        self.cluster = cluster
        self.retries = retries
        self.restore_env = restore_env or {}  # put back into os.environ at close (None: the variable was unset)
        # a plugin, not client.run: workers of a job queue join later and must be limited too
        client.register_plugin(SingleThreadPlugin(), name=SingleThreadPlugin.name)

    @property
    def n_workers(self) -> int:
        return len(self.client.scheduler_info().get("workers", {}))

    @property
    def dashboard_link(self) -> str | None:
        return getattr(self.client, "dashboard_link", None)

    def imap_unordered(self, fn: Callable[..., Any], items: Sequence[Any], *args: Any) -> Iterator[tuple[int, Any]]:
        from distributed import as_completed

        if not items:
            return
        scattered = [self.client.scatter([a], broadcast=True, hash=False)[0] for a in args]
        futures = [self.client.submit(fn, item, *scattered, pure=False, retries=self.retries) for item in items]
        index = {f.key: i for i, f in enumerate(futures)}
        try:
            for n, fut in enumerate(as_completed(futures), 1):
                result = fut.result()
                fut.release()  # the worker drops its copy now, not when the slide ends: flat in slide size
                yield index[fut.key], result
                if n % TRIM_EVERY == 0:  # this process only receives results: hand their freed memory back
                    release_freed_memory()
        finally:
            for f in futures:
                f.release()

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        for key, value in self.restore_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def __enter__(self) -> DaskRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def local_dask_runner(n_workers: int, memory_limit: str = "auto") -> DaskRunner:
    """A local cluster of ``n_workers`` single-threaded worker processes."""
    import dask
    from distributed import Client, LocalCluster

    if n_workers < 1:
        raise ConfigError(f"need at least one worker, got {n_workers}")
    tunables = worker_tunables()
    spawn_env = {"distributed.nanny.pre-spawn-environ.GLIBC_TUNABLES": tunables} if tunables else {}
    # each nanny copies its pre-spawn environment into this process's os.environ whenever it (re)starts a worker
    # (threads 1, huge pages): the caller's environment is put back when the runner closes
    spawned = {*(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}), "GLIBC_TUNABLES"}
    saved = {key: os.environ.get(key) for key in spawned}
    with dask.config.set(spawn_env):  # read by each nanny when it is made, set before its worker process starts
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            memory_limit=memory_limit,
            dashboard_address=":0",
            env=worker_env(),
        )
    client = Client(cluster)
    log_dashboard(client)
    return DaskRunner(client, cluster, restore_env=saved)


def log_dashboard(client: Any) -> None:
    """One log line with the Dask dashboard address (where to watch the tasks)."""
    import importlib.util

    link = getattr(client, "dashboard_link", None) or "none"
    hint = "" if importlib.util.find_spec("bokeh") else " (the page needs: pip install 'bokeh>=3.1')"
    log.info("dask dashboard: %s%s", link, hint)


def make_runner(workers: int) -> TaskRunner:
    """``--workers 1``: in-process; more: a local Dask cluster of processes."""
    if workers <= 1:
        return InProcessRunner(threads=int(os.environ.get("HISTOSEG_THREADS", "1")))
    return local_dask_runner(workers)
