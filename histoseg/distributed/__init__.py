"""Generic task runners on Dask (layer 1): knows Dask, job queues and devices, not nuclei."""

from histoseg.distributed.cluster import CLUSTER_KINDS, ClusterSpec, open_runner
from histoseg.distributed.runner import DaskRunner, InProcessRunner, TaskRunner, local_dask_runner, make_runner

__all__ = [
    "CLUSTER_KINDS",
    "ClusterSpec",
    "DaskRunner",
    "InProcessRunner",
    "TaskRunner",
    "local_dask_runner",
    "make_runner",
    "open_runner",
]
