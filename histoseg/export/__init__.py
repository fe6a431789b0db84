"""Exporters of an :class:`~histoseg.types.InstanceTable` (layer 4, design.md section 7).

QuPath GeoJSON, an OME-NGFF 0.4 Zarr (slide image at the root, labels under it), a Parquet nucleus
table, ``provenance.json`` and the ``_SUCCESS`` marker; every file or folder appears atomically. The
``...Writer`` classes take a slide's nuclei band after band (memory flat in slide size); the ``write_...``
functions write one table.
"""

from histoseg.atomic import atomic_dir, atomic_file
from histoseg.export.geojson import (
    QUPATH_MEASUREMENT_NAMES,
    GeoJSONWriter,
    feature_uuid,
    qupath_name,
    write_geojson,
)
from histoseg.export.geometry import RepairStats, clean_polygon
from histoseg.export.parquet import ParquetTableWriter, write_parquet
from histoseg.export.provenance import write_provenance, write_success
from histoseg.export.zarr_image import SlideImage
from histoseg.export.zarr_labels import LabelZarrWriter, pyramid_shapes, write_label_zarr

__all__ = [
    "QUPATH_MEASUREMENT_NAMES",
    "GeoJSONWriter",
    "LabelZarrWriter",
    "ParquetTableWriter",
    "RepairStats",
    "SlideImage",
    "atomic_dir",
    "atomic_file",
    "clean_polygon",
    "feature_uuid",
    "pyramid_shapes",
    "qupath_name",
    "write_geojson",
    "write_label_zarr",
    "write_parquet",
    "write_provenance",
    "write_success",
]
