"""The region task: slide path + Region + predictor reference + settings in, owned nuclei out.

Tasks are independent and idempotent (design.md section 1): each worker opens the slide and loads the
model itself (cached per process), so the same function runs in-process, on a Dask worker or in a job.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from histoseg.inference import DensePredictor
from histoseg.io import SlideReader, open_slide
from histoseg.postprocess import WatershedParams, instance_centroids, measure_instances, separate_instances
from histoseg.stitching import owned_mask, touches_halo_edge
from histoseg.types import InstanceTable, PlaneInfo, Region

_READERS: dict[tuple[object, ...], SlideReader] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class SlideTaskSpec:
    """What every region task of one slide shares (small and picklable)."""

    slide_path: str
    backend: str
    slide_mpp: float | None
    mpp: float  # processing mpp (the model's)
    plane: PlaneInfo  # classes, scales and plane shape: the same for every region
    params: WatershedParams
    strict_halo: bool = False
    type_weights: tuple[float, ...] | None = None  # the card's per-class type weights (postprocess.decide_types)


@dataclass
class RegionResult:
    region: Region
    table: InstanceTable
    timings: dict[str, float] = field(default_factory=dict)


def _reader(spec: SlideTaskSpec) -> SlideReader:
    st = os.stat(spec.slide_path)  # a file changed in place is a new slide, not the cached reader's
    key = (spec.slide_path, spec.backend, spec.slide_mpp, st.st_ino, st.st_size, st.st_mtime_ns)
    with _LOCK:
        if key not in _READERS:
            if len(_READERS) > 8:
                for r in _READERS.values():
                    r.close()
                _READERS.clear()
            _READERS[key] = open_slide(spec.slide_path, backend=spec.backend, mpp=spec.slide_mpp)
        return _READERS[key]


def run_region(region: Region, spec: SlideTaskSpec, predictor: DensePredictor) -> RegionResult:
    """Read core+halo, predict, separate instances, keep the owned ones and measure them."""
    from histoseg.errors import HaloTooSmallError

    t = {}
    t0 = time.perf_counter()
    reader = _reader(spec)
    rb = region.read
    image = reader.read_plane(rb, spec.mpp)
    t["read"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    np_prob, hv, tp = predictor.predict(image, region)
    t["network"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    labels = separate_instances(np_prob, hv, spec.mpp, spec.params)
    ids, cyx, slices = instance_centroids(labels, origin_yx=(rb.y, rb.x))  # plane centroids, exact
    own = owned_mask(cyx, region) if len(ids) else np.zeros(0, bool)
    keep, keep_c = ids[own], cyx[own]
    edge = touches_halo_edge(slices, keep, labels.shape, region, spec.plane.plane_shape)
    table = measure_instances(
        labels,
        keep,
        keep_c,
        slices,
        origin_yx=(rb.y, rb.x),
        image=image,
        np_prob=np_prob,
        tp_prob=tp,
        plane=spec.plane,
        type_weights=spec.type_weights,
    )
    table.edge_touching = int(edge.sum())
    if spec.strict_halo and table.edge_touching:
        raise HaloTooSmallError(
            f"{table.edge_touching} nucleus/nuclei in region {region.key} touch the halo edge: the halo "
            f"({region.halo} px) is smaller than the largest nucleus plus the network context"
        )
    t["postprocess"] = time.perf_counter() - t0
    return RegionResult(region=region, table=table, timings=t)
