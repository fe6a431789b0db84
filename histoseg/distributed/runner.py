"""Generic task runners: in-process, or a Dask distributed cluster (knows Dask, not nuclei).

``LocalDaskRunner`` starts worker *processes* with one thread each and single-threaded math libraries:
two busy threads per process ran slower than one on small shared machines (docs/facts.md). Results come
back as tasks complete (``as_completed``), each with its item's index: callers that need determinism order
by that index (stitching orders regions by raster position), never by arrival.
``--workers 1`` runs tasks in this process with ``HISTOSEG_THREADS`` math threads (default 1).

The in-process runner also tells glibc's allocator to keep freed memory (:func:`keep_freed_memory`): a region's
network activations are hundreds of MB, served by ``mmap`` and handed back to the kernel after every
forward pass, so each region faulted them in again page by page (measured: 2.3 million minor page faults
and 6.6 s of system time in a 37 s CPU run on CMU-1-Small-Region; with the buffers kept, 0.25 million and
1.6 s). The results do not change: only where the bytes live. Between tasks it hands the free memory back
(:func:`release_freed_memory`), so the process stays flat however many regions a slide has (see
:class:`InProcessRunner`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from histoseg.errors import ConfigError, HistosegError

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
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536  # glibc's defaults (mallopt(3))
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
KEEP_ALL = 2**31 - 1  # mallopt takes an int: free memory above this at the heap's top is still trimmed
KEEP_MEMORY_ENV = "HISTOSEG_KEEP_MEMORY"  # "0" leaves the allocator at its defaults
TRIM_EVERY = 8  # a Dask client returns the heap's free memory to the kernel after this many results


def keep_freed_memory(keep_bytes: int = KEEP_ALL) -> bool:
    """Make glibc serve large blocks from the heap and keep freed ones for reuse (True when applied).

    Why: the same large buffers are allocated and freed for every region; by default glibc maps each one
    fresh (``mmap``) and unmaps it on free, so every region pays page faults and kernel time for memory it
    used a moment before. With mmap off and a high trim threshold, freed blocks stay in the heap and the
    next region reuses them. ``keep_bytes`` bounds the free memory kept at the heap's top (the rest goes
    back to the kernel): the price is resident memory, measured on CMU-1-Small-Region in one process (maximum
    RSS / system time / minor faults): glibc defaults 1.12 GB / 4.9 s / 2.1 M; ``KEEP_ALL`` 1.35 GB / 1.1 s /
    0.27 M; a 256 MB bound 1.23 GB / 2.9 s / 1.25 M. Only ``--workers 1`` (``InProcessRunner``) applies it:
    on a 6000² slide it cut 1.46x of the CPU time at 1.84 GB peak (vs 1.24 GB), but two Dask workers doing
    the same reached 3.8 GB in all (vs 2.5 GB), over the 3 GB budget, so workers keep glibc's defaults.
    No effect outside glibc (e.g. macOS, musl) or with ``HISTOSEG_KEEP_MEMORY=0``.
    """
    mallopt = None if os.environ.get(KEEP_MEMORY_ENV, "1") == "0" else _glibc("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, max(0, min(keep_bytes, KEEP_ALL))))


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
    """Put back glibc's documented defaults for what :func:`keep_freed_memory` changed (mmap for large blocks,
    128 KiB trim threshold) and hand the kept memory back, so a library caller's process is left as found."""
    mallopt = _glibc("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        return
    mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
    release_freed_memory()


WORKER_MMAP_THRESHOLD = 8 << 20  # bytes; see worker_tunables
WORKER_TUNABLES: dict[str, str] = {
    "glibc.malloc.hugetlb": "1",
    "glibc.malloc.mmap_threshold": str(WORKER_MMAP_THRESHOLD),
    "glibc.malloc.trim_threshold": str(WORKER_MMAP_THRESHOLD),
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

    ``mmap_threshold`` and ``trim_threshold`` at 8 MiB: a region's arrays (maps, labels, the engine's input and
    outputs: 2-24 MB each for a 1408² region) are allocated and freed again for every region. By default glibc
    serves blocks above a threshold that only rises as blocks are freed, and in a worker's task thread (a
    non-main arena) gives freed memory back soon, so most of them were mapped and zeroed by the kernel afresh:
    ~24 s of system time on a 10000² slide with two workers. From 8 MiB up they still are; below, freed blocks
    stay for the next region. Measured (2-core AMD EPYC, AVX2, int8, 10000² slide, 2 workers, default
    settings, one after another): system time 23.8 -> 13.3 s, wall 94.0 -> 88.3 s, peak RSS of all processes
    2.67 -> 2.68 GB; a 16 MiB threshold gave 11.2 s and 86.2 s but 2.86 GB, 32 MiB 3.07 GB (issue 13's budget
    is 3 GB)."""
    env = os.environ if environ is None else environ
    if env.get(KEEP_MEMORY_ENV, "1") == "0":
        return None
    own = env.get("GLIBC_TUNABLES", "")
    theirs = {item.split("=", 1)[0] for item in own.split(":") if item}
    add = [f"{k}={v}" for k, v in WORKER_TUNABLES.items() if k not in theirs]
    return ":".join([own, *add] if own else add) or None


def release_freed_memory() -> None:
    """Give the heap's free memory back to the kernel now (glibc ``malloc_trim``; a no-op elsewhere).

    Called when a slide's regions are done: the buffers kept for the next region are not needed while the
    client stitches and exports the slide's last bands and closes its outputs, and would otherwise add to
    that stage's peak."""
    trim = _glibc("malloc_trim", ctypes.c_size_t)
    if trim is not None:
        trim(0)


class InProcessRunner:
    """Runs tasks one after another in this process (``--workers 1``), handing the heap's free memory back to
    the kernel after each task.

    Why the hand-back: every result stays in this process until the slide is stitched, so small long-lived
    allocations land between the large blocks each task frees, and glibc could neither reuse nor return that
    memory. Measured on a 10k² slide (97 regions of 1024, AMD EPYC, default settings): with OpenVINO the process
    grew by ~60 MB a region to 7.1 GB; with the hand-back it peaked at 1.4 GB at the same speed (PyTorch with
    glibc's defaults had reached 4.3 GB). PyTorch pays for it: on a 4000² slide its CPU time rose 18% (the kept
    activation buffers are faulted in again), against a peak of 1.35 GB instead of 1.83 GB. Dask workers send
    their results away, so their heaps do not fill this way."""

    n_workers = 1

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads
        _limit_threads(threads)
        self._kept = keep_freed_memory()  # undone by close(): the process is the caller's, not ours

    def imap_unordered(self, fn: Callable[..., Any], items: Sequence[Any], *args: Any) -> Iterator[tuple[int, Any]]:
        for i, item in enumerate(items):
            result = fn(item, *args)
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


class LazyRunner:
    """Starts the wrapped runner at the first task, so work that turns out to be done starts no cluster.

    A start that fails is remembered and raised again for every later use, without a second attempt. Once
    closed it stays closed: a task asked for afterwards (a pipelined batch's look-ahead slide after an
    interrupt) raises instead of starting a second cluster.
    """

    def __init__(self, start: Callable[[], TaskRunner]) -> None:
        self._start = start
        self._runner: TaskRunner | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()  # a pipelined batch asks from two threads: start one runner, not two
        self._closed = False

    @property
    def started(self) -> bool:
        return self._runner is not None

    def runner(self) -> TaskRunner:
        with self._lock:
            if self._closed:
                raise HistosegError("the task runner was closed (the batch ended or was interrupted)")
            if self._error is not None:
                raise self._error
            if self._runner is None:
                try:
                    self._runner = self._start()
                except Exception as exc:
                    self._error = exc
                    raise
            return self._runner

    @property
    def n_workers(self) -> int:
        return self.runner().n_workers

    def imap_unordered(self, fn: Callable[..., Any], items: Sequence[Any], *args: Any) -> Iterator[tuple[int, Any]]:
        return self.runner().imap_unordered(fn, items, *args)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._runner is not None:
                self._runner.close()
                self._runner = None

    def __enter__(self) -> LazyRunner:
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
            env=SINGLE_THREAD_ENV,
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
