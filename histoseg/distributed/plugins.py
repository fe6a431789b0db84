"""Dask plugins installed on every worker of a run, including workers that join late (job queues)."""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from histoseg.distributed.runner import limit_worker_threads


class SingleThreadPlugin(WorkerPlugin):
    """One torch/OpenCV/BLAS thread per worker: two busy threads per process ran slower than one (facts.md)."""

    name = "histoseg-single-thread"

    def setup(self, worker: Any) -> None:
        limit_worker_threads()
