"""Exporters of an :class:`~histoseg.types.InstanceTable` (layer 4, design.md section 7).

QuPath GeoJSON, OME-NGFF 0.4 label Zarr, a Parquet nucleus table, ``provenance.json`` and the
``_SUCCESS`` marker; every file or folder appears atomically.
"""

from histoseg.export.atomic import atomic_dir, atomic_file
from histoseg.export.geojson import feature_uuid, write_geojson
from histoseg.export.geometry import RepairStats, clean_polygon
from histoseg.export.parquet import write_parquet
from histoseg.export.provenance import write_provenance, write_success
from histoseg.export.zarr_labels import pyramid_shapes, write_label_zarr

__all__ = [
    "RepairStats",
    "atomic_dir",
    "atomic_file",
    "clean_polygon",
    "feature_uuid",
    "pyramid_shapes",
    "write_geojson",
    "write_label_zarr",
    "write_parquet",
    "write_provenance",
    "write_success",
]
