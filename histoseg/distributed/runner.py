"""Generic task runners: in-process, or a Dask distributed cluster (knows Dask, not nuclei).

``LocalDaskRunner`` starts worker *processes* with one thread each and single-threaded math libraries:
two busy threads per process ran slower than one on small shared machines (docs/facts.md). Results come
back as tasks complete (``as_completed``), each with its item's index: callers that need determinism order
by that index (stitching orders regions by raster position), never by arrival.
``--workers 1`` runs tasks in this process with ``HISTOSEG_THREADS`` math threads (default 1).
"""

from __future__ import annotations

import logging
import os
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


class InProcessRunner:
    """Runs tasks one after another in this process (``--workers 1``)."""

    n_workers = 1

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads
        _limit_threads(threads)

    def imap_unordered(self, fn: Callable[..., Any], items: Sequence[Any], *args: Any) -> Iterator[tuple[int, Any]]:
        for i, item in enumerate(items):
            yield i, fn(item, *args)

    def close(self) -> None:
        pass

    def __enter__(self) -> InProcessRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _limit_threads(n: int) -> None:
    try:
        import torch

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
    _limit_threads(1)


class DaskRunner:
    """Runs tasks on a Dask distributed client (local processes, a job-queue cluster, or an address)."""

    def __init__(self, client: Any, cluster: Any | None = None, retries: int = 2) -> None:
        from histoseg.distributed.plugins import SingleThreadPlugin

        self.client = client
        self.cluster = cluster
        self.retries = retries
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
            for fut in as_completed(futures):
                yield index[fut.key], fut.result()
        finally:
            for f in futures:
                f.release()

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> DaskRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LazyRunner:
    """Starts the wrapped runner at the first task, so work that turns out to be done starts no cluster.

    A start that fails is remembered and raised again for every later use, without a second attempt.
    """

    def __init__(self, start: Callable[[], TaskRunner]) -> None:
        self._start = start
        self._runner: TaskRunner | None = None
        self._error: BaseException | None = None

    @property
    def started(self) -> bool:
        return self._runner is not None

    def runner(self) -> TaskRunner:
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
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    def __enter__(self) -> LazyRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def local_dask_runner(n_workers: int, memory_limit: str = "auto") -> DaskRunner:
    """A local cluster of ``n_workers`` single-threaded worker processes."""
    from distributed import Client, LocalCluster

    if n_workers < 1:
        raise ConfigError(f"need at least one worker, got {n_workers}")
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
    return DaskRunner(client, cluster)


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
