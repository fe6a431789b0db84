"""Readers of the shared nuclei datasets (layer 1): MoNuSeg 2018, DSB 2018 H&E subset, CRCHisto -> ``Sample``s.

Used by training, evaluation, benchmarks and tests. Every reader rescales to a requested pixel size
(``target_mpp``, µm/px; ``None`` keeps the native size), keeps no cache and returns samples in sorted-name
order; a missing folder raises :class:`histoseg.errors.DatasetError`. One module per dataset, the shared
``Sample`` type and resampling helpers in :mod:`histoseg.datasets.common`.
"""

from histoseg.datasets.common import Sample, resize_image, resize_labels, scale_points
from histoseg.datasets.crchisto import CRCHISTO_CLASSES, CRCHISTO_MPP, load_crchisto
from histoseg.datasets.dsb import load_dsb
from histoseg.datasets.monuseg import MONUSEG_DEFAULT_MPP, load_monuseg

__all__ = [
    "CRCHISTO_CLASSES",
    "CRCHISTO_MPP",
    "MONUSEG_DEFAULT_MPP",
    "Sample",
    "load_crchisto",
    "load_dsb",
    "load_monuseg",
    "resize_image",
    "resize_labels",
    "scale_points",
]
