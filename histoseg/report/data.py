"""What a QC report reads: one slide's output folder, loaded from disk only.

The report is built from files (``provenance.json``, ``tissue_mask.png``, ``<stem>.nuclei.parquet``) and
the slide itself, never from in-memory pipeline objects, so ``histoseg report OUT`` and the call at the end
of ``segment_slide`` run the same code and give the same page.

Class convention of the Parquet table: class id ``k >= 1`` is ``class_colors[k - 1]`` of the ``histoseg``
file metadata, id 0 is unclassified (grey); names come from the ``class_name`` column.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.parquet as pq

from histoseg.errors import OutputError

__all__ = ["UNCLASSIFIED_COLOR", "NucleiColumns", "SlideOutputs", "load_slide_outputs", "slide_folders"]

UNCLASSIFIED_COLOR = (160, 160, 160)
_FALLBACK_COLORS = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0))
_COLUMNS = ("centroid_x", "centroid_y", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1", "class_id")
_MEASURES = ("area_um2", "eccentricity", "mean_hematoxylin")


@dataclass
class NucleiColumns:
    """The Parquet columns a report needs (polygons are decoded later, only for the shown fields)."""

    centroids: np.ndarray  # (N, 2) float64 (x, y) level-0 px
    bboxes: np.ndarray  # (N, 4) float64 (x0, y0, x1, y1) level-0 px
    class_ids: np.ndarray  # (N,) int64
    measures: dict[str, np.ndarray]  # area_um2, eccentricity, mean_hematoxylin (missing ones absent)
    class_names: dict[int, str]  # class id -> name, from the class_name column
    class_colors: dict[int, tuple[int, int, int]]  # class id -> RGB
    metadata: dict[str, Any]  # the ``histoseg`` file metadata

    def __len__(self) -> int:
        return int(self.class_ids.shape[0])

    def class_counts(self) -> dict[str, int]:
        """Nuclei per class name, in class id order."""
        ids, counts = np.unique(self.class_ids, return_counts=True)
        return {self.class_names.get(int(i), f"class {int(i)}"): int(c) for i, c in zip(ids, counts, strict=True)}

    def color_of(self, class_id: int) -> tuple[int, int, int]:
        return self.class_colors.get(int(class_id), UNCLASSIFIED_COLOR)


@dataclass
class SlideOutputs:
    """One slide's output folder as the report sees it."""

    folder: Path
    stem: str
    provenance: dict[str, Any]
    tissue: np.ndarray | None  # bool mask at thumbnail resolution over the whole level-0 image
    nuclei: NucleiColumns | None  # None when no Parquet table was written
    parquet: Path | None
    success: bool
    problems: list[str] = field(default_factory=list)  # what could not be read

    @property
    def slide_path(self) -> str | None:
        path: str | None = self.provenance.get("slide", {}).get("path")
        return path

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        dims = self.provenance.get("slide", {}).get("dimensions") or [0, 0]
        return int(dims[0]), int(dims[1])

    @property
    def mpp0(self) -> float | None:
        """Level-0 µm/px: the Parquet metadata's (what was used), else the provenance's."""
        meta = self.nuclei.metadata if self.nuclei is not None else {}
        v = meta.get("mpp0", self.provenance.get("slide", {}).get("mpp"))
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) and v > 0 else None

    @property
    def scale(self) -> float:
        """Level-0 px per processing-plane px."""
        return float(self.provenance.get("processing", {}).get("scale_level0_per_plane_px", 1.0))

    def tissue_fraction(self) -> float | None:
        return float(self.tissue.mean()) if self.tissue is not None and self.tissue.size else None

    def tissue_area_mm2(self) -> float | None:
        """Tissue area from the mask: its fraction of the slide times the slide's physical area."""
        frac, mpp0 = self.tissue_fraction(), self.mpp0
        w, h = self.dimensions
        if frac is None or mpp0 is None or not w or not h:
            return None
        return frac * w * h * mpp0 * mpp0 / 1e6

    def density_per_mm2(self) -> float | None:
        """Nuclei per mm² of tissue (None when unknown)."""
        area = self.tissue_area_mm2()
        if self.nuclei is None or area is None or area <= 0:
            return None
        return len(self.nuclei) / area


def slide_folders(out_root: Path) -> list[Path]:
    """Slide output folders below a batch output folder (those with a provenance.json), sorted."""
    if not out_root.is_dir():
        raise OutputError(f"output folder not found: {out_root}")
    if (out_root / "provenance.json").is_file():
        return [out_root]
    return sorted(
        p for p in out_root.iterdir()
        if p.is_dir() and not p.name.startswith((".", "_")) and (p / "provenance.json").is_file()
    )


def load_slide_outputs(folder: Path, *, measures: bool = True) -> SlideOutputs:
    """Read provenance, tissue mask and the nucleus table of one slide folder.

    ``measures=False`` reads only counts and classes (the batch index). A missing or unreadable optional
    file is recorded in ``problems`` rather than raised: a report of a damaged folder is still useful.
    """
    prov_path = folder / "provenance.json"
    try:
        provenance = json.loads(prov_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OutputError(f"{folder}: cannot read provenance.json ({exc})") from exc
    problems: list[str] = []
    tissue = None
    mask_path = folder / "tissue_mask.png"
    if mask_path.is_file():
        img = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        if img is None:
            problems.append("tissue_mask.png could not be decoded")
        else:
            tissue = img > 127
    else:
        problems.append("tissue_mask.png is missing")
    stem = _stem(folder, provenance)
    parquet = folder / f"{stem}.nuclei.parquet"
    found = sorted(folder.glob("*.nuclei.parquet"))
    if not parquet.is_file() and len(found) == 1:
        parquet = found[0]  # a renamed folder: its one table
    nuclei = None
    if parquet.is_file():
        try:
            nuclei = _read_nuclei(parquet, measures)
        except (OSError, ValueError, KeyError) as exc:
            problems.append(f"{parquet.name} could not be read ({exc})")
    else:
        problems.append(f"{parquet.name} is missing (nuclei sections need the Parquet format)")
    return SlideOutputs(
        folder, stem, provenance, tissue, nuclei, parquet if nuclei is not None else None,
        (folder / "_SUCCESS").is_file(), problems,
    )


def _stem(folder: Path, provenance: dict[str, Any]) -> str:
    """The output stem: the folder name (``segment_slide`` names folders by stem)."""
    return folder.name if folder.name else Path(str(provenance.get("slide", {}).get("path", "slide"))).stem


def _read_nuclei(path: Path, measures: bool) -> NucleiColumns:
    pf = pq.ParquetFile(path)
    raw_meta = (pf.schema_arrow.metadata or {}).get(b"histoseg", b"{}")
    metadata: dict[str, Any] = json.loads(raw_meta.decode())
    names_in_file = set(pf.schema_arrow.names)
    wanted = [c for c in (*_COLUMNS, "class_name") if c in names_in_file]
    if measures:
        wanted += [m for m in _MEASURES if m in names_in_file]
    tab = pf.read(columns=wanted)
    n = tab.num_rows

    def col(name: str) -> np.ndarray:
        return tab.column(name).to_numpy(zero_copy_only=False) if name in tab.column_names else np.zeros(n)

    class_ids = col("class_id").astype(np.int64)
    names: dict[int, str] = {}
    if "class_name" in tab.column_names and n:
        for cid, name in zip(class_ids.tolist(), tab.column("class_name").to_pylist(), strict=True):
            names.setdefault(int(cid), str(name))
            if len(names) == len(np.unique(class_ids)):
                break
    colors = _class_colors(metadata, set(np.unique(class_ids).tolist()))
    return NucleiColumns(
        centroids=np.stack([col("centroid_x"), col("centroid_y")], axis=1).astype(np.float64).reshape(n, 2),
        bboxes=np.stack([col(c) for c in _COLUMNS[2:6]], axis=1).astype(np.float64).reshape(n, 4),
        class_ids=class_ids,
        measures={m: col(m).astype(np.float64) for m in _MEASURES if m in tab.column_names},
        class_names=names,
        class_colors=colors,
        metadata=metadata,
    )


def _class_colors(metadata: dict[str, Any], present: set[int]) -> dict[int, tuple[int, int, int]]:
    """Class id -> RGB: ``class_colors[k - 1]`` for k >= 1, grey for 0, a fixed palette past the list."""
    listed = metadata.get("class_colors") or []
    out: dict[int, tuple[int, int, int]] = {0: UNCLASSIFIED_COLOR}
    for k in sorted(present | set(range(1, len(listed) + 1))):
        if k == 0:
            continue
        if k - 1 < len(listed):
            out[k] = (int(listed[k - 1][0]), int(listed[k - 1][1]), int(listed[k - 1][2]))
        else:
            out[k] = _FALLBACK_COLORS[(k - 1) % len(_FALLBACK_COLORS)]
    return out
