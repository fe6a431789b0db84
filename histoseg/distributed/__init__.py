"""Generic task runners on Dask (layer 1): knows Dask and processes, not nuclei."""

from histoseg.distributed.runner import DaskRunner, InProcessRunner, TaskRunner, local_dask_runner, make_runner

__all__ = ["DaskRunner", "InProcessRunner", "TaskRunner", "local_dask_runner", "make_runner"]
