"""Post-processing: NP/HV maps to instances, then per-instance type, polygon and measurements."""

from histoseg.postprocess.instances import (
    MEASUREMENTS,
    decide_types,
    hematoxylin,
    instance_centroids,
    measure_instances,
)
from histoseg.postprocess.watershed import WatershedParams, separate_instances

__all__ = [
    "MEASUREMENTS",
    "WatershedParams",
    "decide_types",
    "hematoxylin",
    "instance_centroids",
    "measure_instances",
    "separate_instances",
]
