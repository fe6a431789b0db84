"""OME-Zarr (OME-NGFF 0.4, plain or bioformats2raw layout) multiscale images as slides.

Level geometry comes from the array shapes, not from the ``scale`` transforms: real files get the latter
wrong (the shared CMU-1 copy claims 2x for a 3.87x level). The mpp is the level-0 x scale when its axis
unit is a length; objective power is taken from ``OME/METADATA.ome.xml`` when present.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from histoseg.errors import CorruptSlideError, UnsupportedFormatError, UnsupportedImageError
from histoseg.io.base import SlideReader, as_float, resolve_mpp
from histoseg.io.limits import check_expansion, folder_bytes
from histoseg.io.resample import U8, to_rgb
from histoseg.types import Box, SlideMeta

_UNIT_UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6}


def is_zarr_dir(path: Path) -> bool:
    """True for a folder that looks like a Zarr group (v2 or v3)."""
    return path.is_dir() and any((path / n).is_file() for n in (".zgroup", ".zattrs", "zarr.json"))


def _multiscales(attrs: dict[str, Any]) -> list[dict[str, Any]] | None:
    ms = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    return ms if isinstance(ms, list) and ms else None


class OmeZarrReader(SlideReader):
    """Reader of the first image (series 0) of an OME-Zarr folder."""

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        import zarr

        self._path = str(path)
        try:
            root = zarr.open_group(self._path, mode="r")
            group = root
            ms = _multiscales(dict(root.attrs))
            if ms is None and "bioformats2raw.layout" in root.attrs:
                group = root["0"]  # type: ignore[assignment]
                ms = _multiscales(dict(group.attrs))
            if ms is None:
                raise UnsupportedFormatError(f"{self._path}: a Zarr folder without OME-NGFF multiscales")
            axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms[0]["axes"]]
            datasets = ms[0]["datasets"]
            self._arrays: list[Any] = [group[d["path"]] for d in datasets]
        except (UnsupportedFormatError, UnsupportedImageError):
            raise
        except Exception as e:
            raise CorruptSlideError(f"{self._path}: cannot read the OME-Zarr structure ({e})") from e
        if "x" not in axes or "y" not in axes:
            raise UnsupportedFormatError(f"{self._path}: OME-Zarr axes {axes} lack x/y")
        if self._arrays[0].dtype != np.uint8:
            raise UnsupportedImageError(f"{self._path}: {self._arrays[0].dtype} pixels; 8-bit RGB only")
        self._axes = axes
        dims = tuple((int(a.shape[axes.index("x")]), int(a.shape[axes.index("y")])) for a in self._arrays)
        check_expansion(self._path, "level 0", dims[0][0], dims[0][1], folder_bytes(self._path))
        w0, h0 = dims[0]
        downs = tuple((w0 / w + h0 / h) / 2 for w, h in dims)
        use_mpp, source = resolve_mpp(self._level0_mpp(ms[0], datasets[0], axes), mpp)
        self.meta = SlideMeta(
            path=self._path,
            backend="omezarr",
            vendor="ome-zarr",
            level_dimensions=dims,
            level_downsamples=downs,
            mpp=use_mpp,
            objective_power=self._objective(Path(self._path)),
            mpp_source=source,
            properties={"omezarr.version": str(ms[0].get("version", "")), "omezarr.axes": ",".join(axes)},
        )

    @staticmethod
    def _level0_mpp(ms: dict[str, Any], dataset: dict[str, Any], axes: list[str]) -> float | None:
        ix = axes.index("x")
        ax = ms["axes"][ix]
        unit = ax.get("unit") if isinstance(ax, dict) else None
        for t in dataset.get("coordinateTransformations", []):
            if t.get("type") == "scale" and unit in _UNIT_UM:
                v = as_float(t["scale"][ix])
                return None if v is None else v * _UNIT_UM[unit]
        return None

    @staticmethod
    def _objective(path: Path) -> float | None:
        xml = path / "OME" / "METADATA.ome.xml"
        if not xml.is_file():
            return None
        m = re.search(r'NominalMagnification="([0-9.]+)"', xml.read_text(errors="replace")[:100_000])
        return as_float(m.group(1)) if m else None

    def _fetch(self, level: int, box: Box) -> U8:
        sel: list[Any] = []
        for name in self._axes:
            if name == "x":
                sel.append(slice(box.x, box.x1))
            elif name == "y":
                sel.append(slice(box.y, box.y1))
            elif name == "c":
                sel.append(slice(None))
            else:
                sel.append(0)
        try:
            a = np.asarray(self._arrays[level][tuple(sel)])
        except Exception as e:
            raise CorruptSlideError(f"{self._path}: cannot decode level {level} {box} ({e})") from e
        kept = [n for n in self._axes if n in ("y", "x", "c")]
        order = [kept.index("y"), kept.index("x")] + ([kept.index("c")] if "c" in kept else [])
        return to_rgb(np.transpose(a, order))

    def read_level(self, level: int, box: Box) -> U8:
        return self._padded(level, box, lambda b: self._fetch(level, b))
