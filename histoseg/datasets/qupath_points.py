"""QuPath point annotations (nucleus clicks) in and out of GeoJSON, the format of *File > Export objects as GeoJSON*.

A pathologist clicks nuclei with QuPath's Points tool, one points annotation per class, and exports them.
:func:`read_qupath_points` turns such a file into a :class:`PointAnnotations`; :func:`write_qupath_points`
writes points the way QuPath's own export does, so they can be opened in QuPath for review or correction.

What QuPath writes, verified in its source (github.com/qupath/qupath, main branch of 2026-08 and the tags
v0.2.3, v0.3.2, v0.4.0 to v0.7.0):

- ``qupath-core/.../lib/io/PathIO.java`` (``exportObjectsAsGeoJSON``): with ``FEATURE_COLLECTION`` a
  ``{"type": "FeatureCollection", "features": [...]}``; without it one object is written as a bare Feature
  and several as a JSON array of Features. A name ending in ``.gz`` is gzip-compressed, one ending in
  ``.zip`` holds a single ``<stem>.geojson`` entry. Its reader takes ``.gz`` too.
- ``QuPathTypeAdapters.java`` (``PathObjectTypeAdapters.java`` before v0.4), ``PathObjectTypeAdapter.write``:
  key order ``type`` ("Feature"), ``id`` (the object's UUID string, since v0.4), ``geometry``,
  ``properties``. ``properties`` holds ``objectType`` ("annotation", "detection", "cell", "tile",
  "tmaCore"; since v0.4, v0.3 wrote ``object_type`` and v0.2 put the Java class name in ``id``), then
  ``name`` and ``color`` when the object has them, ``classification`` when classified, ``isLocked: true``
  only when locked (v0.2/v0.3 always wrote ``isLocked``), ``measurements`` when there are any.
- ``GsonTools.java`` (``PathClassTypeAdapter``): since v0.4 ``classification`` is ``{"name": n, "color":
  [r, g, b]}`` (``"names": [...]`` for a derived class such as ``Tumor: Positive``; a fourth value only
  for a partly transparent colour). It also reads a bare string, and the pre-v0.4 form: Gson's default
  serialisation ``{"name": n, "colorRGB": argb}`` (a signed 32-bit ARGB int as Java prints it, e.g.
  -3670016 = opaque (200, 0, 0)), with ``parentClass`` nesting for derived classes; ``{}`` is no class.
- ``roi/GeometryTools.java`` (``pointsToGeometry``): a points ROI becomes a ``Point`` when it holds one
  point and a ``MultiPoint`` otherwise. ``ROITypeAdapters.java`` writes coordinates as ``[x, y]`` with at
  most 2 decimals, adds ``"plane"`` only off the default z/t plane, and reads ``Point``/``MultiPoint``
  coordinates of two or three numbers.
- ``objects/classes/PathClass.java`` (``getDefaultColor``): a class name met without a colour gets
  ``java.util.Random(name.hashCode())``: three ``nextInt(256)`` draws, repeated while all three are < 40.
  :func:`default_class_color` computes the same, so files without colours show QuPath's colours here.

Coordinates are level-0 pixels as QuPath stores them: continuous, origin at the top-left corner of the
image, pixel ``(c, r)`` covering ``[c, c+1) x [r, r+1)``, so a click on its centre is ``(c+0.5, r+0.5)``.
The dataset readers (:mod:`histoseg.datasets.common`) use pixel-centre coordinates instead: convert with
:func:`qupath_to_pixel_centres` / :func:`pixel_centres_to_qupath`. The reader ignores ``plane`` (2-D slides).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import math
import os
import uuid
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histoseg.errors import DatasetError, OutputError

__all__ = [
    "POINTS_NAMESPACE",
    "PointAnnotations",
    "default_class_color",
    "pixel_centres_to_qupath",
    "qupath_to_pixel_centres",
    "read_qupath_points",
    "write_qupath_points",
]

log = logging.getLogger(__name__)

POINTS_NAMESPACE = uuid.UUID("3d0b6c9e-58a4-5f0e-8c51-7a2e4b9f1c63")
"""Fixed namespace of the feature UUIDs :func:`write_qupath_points` derives from content (never change it)."""

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class PointAnnotations:
    """Points read from a QuPath export: ``points`` (N, 2) float64 ``(x, y)`` level-0 pixels as QuPath stores
    them, ``class_index`` (N,) int64 into ``names`` (-1 = unclassified), ``names`` in first-seen order with one
    ``colors`` entry each, and ``ignored``: how many features had another geometry (polygons, lines) or none.
    """

    points: np.ndarray
    class_index: np.ndarray
    names: tuple[str, ...]
    colors: tuple[RGB, ...]
    ignored: int = 0

    def __post_init__(self) -> None:
        n = len(self.points)
        if self.points.shape != (n, 2) or self.class_index.shape != (n,) or len(self.colors) != len(self.names):
            raise ValueError("PointAnnotations: points (N, 2), class_index (N,) and one colour per name needed")
        if n and (self.class_index.min() < -1 or self.class_index.max() >= len(self.names)):
            raise ValueError("PointAnnotations: class_index out of range")

    def __len__(self) -> int:
        return len(self.points)

    def subset(self, mask: np.ndarray) -> PointAnnotations:
        """The points selected by a boolean mask (or index array); names and colours are kept unchanged."""
        sel = np.asarray(mask)
        if sel.dtype == np.bool_ and sel.shape != (len(self),):
            raise ValueError(f"mask has shape {sel.shape}, expected ({len(self)},)")
        return PointAnnotations(
            points=self.points[sel].reshape(-1, 2),
            class_index=self.class_index[sel].reshape(-1),
            names=self.names,
            colors=self.colors,
            ignored=self.ignored,
        )

    def point_class_names(self) -> list[str | None]:
        """Class name of every point (``None`` = unclassified), the ``class_names`` of :func:`write_qupath_points`."""
        return [self.names[i] if i >= 0 else None for i in self.class_index.tolist()]


def qupath_to_pixel_centres(points_xy: np.ndarray) -> np.ndarray:
    """QuPath ``(x, y)`` (pixel ``c`` spans ``[c, c+1)``) -> 0-based pixel-centre coordinates (subtract 0.5)."""
    return np.asarray(points_xy, dtype=np.float64) - 0.5


def pixel_centres_to_qupath(points_xy: np.ndarray) -> np.ndarray:
    """0-based pixel-centre ``(x, y)`` -> QuPath coordinates (add 0.5); inverse of :func:`qupath_to_pixel_centres`."""
    return np.asarray(points_xy, dtype=np.float64) + 0.5


def _java_string_hash(s: str) -> int:
    """Java's ``String.hashCode()``: ``h = 31 h + c`` over UTF-16 code units, as a signed 32-bit int."""
    data = s.encode("utf-16-be")
    h = 0
    for i in range(0, len(data), 2):
        h = (31 * h + (data[i] << 8 | data[i + 1])) & 0xFFFFFFFF
    return h - (1 << 32) if h >= 1 << 31 else h


def default_class_color(name: str) -> RGB:
    """The colour QuPath gives a new class ``name`` that comes without one (``PathClass.getDefaultColor``).

    ``java.util.Random`` seeded with the name's Java hash: a 48-bit linear congruential generator
    (multiplier 0x5DEECE66D, increment 11), ``nextInt(256)`` taking the top 8 of 48 bits; draws of
    three repeat while all three are below 40 (too dark). Stable across runs and machines.
    """
    mask = (1 << 48) - 1
    seed = (_java_string_hash(name) ^ 0x5DEECE66D) & mask

    def next_byte() -> int:
        nonlocal seed
        seed = (seed * 0x5DEECE66D + 0xB) & mask
        return seed >> 40  # nextInt(256) == (256 * next(31)) >> 31 == top 8 bits of the state

    r = g = b = 0
    while r < 40 and g < 40 and b < 40:
        r, g, b = next_byte(), next_byte(), next_byte()
    return r, g, b


def _fail(path: Path, what: str) -> DatasetError:
    return DatasetError(f"{path}: {' '.join(what.split())}")


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetError(f"QuPath points file not found: {path}")
    try:
        raw = path.read_bytes()
        if path.suffix.lower() == ".gz":
            raw = gzip.decompress(raw)
        elif path.suffix.lower() == ".zip":
            with zipfile.ZipFile(io.BytesIO(raw)) as zf:
                names = [n for n in zf.namelist() if n.lower().endswith((".geojson", ".json"))]
                if len(names) != 1:
                    raise _fail(path, f"expected one .geojson entry in the zip file, found {len(names)}")
                raw = zf.read(names[0])
        text = raw.decode("utf-8-sig")
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise _fail(path, f"cannot read QuPath GeoJSON ({type(e).__name__}: {e})") from e
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise _fail(path, f"not JSON ({e})") from e


def _features(path: Path, doc: Any) -> list[Any]:
    """FeatureCollection (or any object with a ``features`` array), a bare list, or a single Feature."""
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        if isinstance(doc.get("features"), list):
            return list(doc["features"])
        if doc.get("type") == "Feature" or "geometry" in doc:
            return [doc]
    raise _fail(path, "not a GeoJSON FeatureCollection, Feature or list of Features")


def _number(path: Path, v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _fail(path, f"non-numeric {what} {json.dumps(v)[:40]}")
    try:
        x = float(v)
    except OverflowError:  # an integer literal beyond the float range
        x = math.inf
    if not math.isfinite(x):
        raise _fail(path, f"non-finite {what} {v}")
    return x


def _coordinate(path: Path, c: Any) -> tuple[float, float]:
    if not isinstance(c, list) or len(c) not in (2, 3):
        raise _fail(path, f"a point coordinate must be [x, y] or [x, y, z], got {json.dumps(c)[:60]}")
    return _number(path, c[0], "coordinate"), _number(path, c[1], "coordinate")


def _color(path: Path, v: Any) -> RGB | None:
    """``[r, g, b(, a)]`` or a packed (A)RGB int; each channel masked to 8 bits as QuPath's ``packRGB`` does."""
    if v is None:
        return None
    if isinstance(v, list) and len(v) in (3, 4):
        r, g, b = (int(_number(path, c, "colour value")) & 0xFF for c in v[:3])
        return r, g, b
    if isinstance(v, int) and not isinstance(v, bool):
        return (v >> 16) & 0xFF, (v >> 8) & 0xFF, v & 0xFF
    raise _fail(path, f"unreadable class colour {json.dumps(v)[:40]}")


def _old_class_names(path: Path, c: Mapping[str, Any], depth: int = 0) -> list[str]:
    """Names along a pre-v0.4 ``parentClass`` chain, root first."""
    parent = c.get("parentClass")
    names = _old_class_names(path, parent, depth + 1) if isinstance(parent, Mapping) and depth < 32 else []
    name = c.get("name")
    if name is not None and not isinstance(name, str):
        raise _fail(path, f"class name must be a string, got {json.dumps(name)[:40]}")
    return names + ([name] if name else [])


def _classification(path: Path, props: Mapping[str, Any]) -> tuple[str | None, RGB | None]:
    """(name, colour) of a feature's classification; derived names joined with ``": "`` as QuPath shows them."""
    c = props.get("classification")
    if c is None:
        return None, None
    if isinstance(c, str):
        return (c or None), None
    if not isinstance(c, Mapping):
        raise _fail(path, f"unreadable classification {json.dumps(c)[:60]}")
    if "colorRGB" in c or "parentClass" in c or not c:  # pre-v0.4 form, or {} = no class
        names = _old_class_names(path, c)
        return (": ".join(names) or None), _color(path, c.get("colorRGB"))
    if isinstance(c.get("names"), list) and c["names"] and all(isinstance(n, str) for n in c["names"]):
        name = ": ".join(c["names"])
    elif isinstance(c.get("name"), str):
        name = c["name"]
    else:
        raise _fail(path, f"classification without a name: {json.dumps(c)[:60]}")
    return (name or None), _color(path, c.get("color"))


def read_qupath_points(path: str | os.PathLike[str]) -> PointAnnotations:
    """Read every ``Point`` and ``MultiPoint`` feature of a QuPath GeoJSON export (any ``objectType``).

    Accepts ``.geojson``/``.json``, ``.gz`` and QuPath's single-entry ``.zip``; a FeatureCollection, a list of
    Features or one Feature. Features with other geometries are skipped and counted in ``ignored``. Classes
    come from ``classification`` (string, name/names + color, or the old name + colorRGB form); a class
    without a colour gets :func:`default_class_color`; the first colour seen for a name wins. Raises
    :class:`DatasetError` (one line naming the file) for a missing or non-JSON file, malformed features,
    non-numeric or non-finite coordinates, or when the file holds no point at all.
    """
    p = Path(path)
    feats = _features(p, _load_json(p))
    xs: list[tuple[float, float]] = []
    cls: list[int] = []
    names: dict[str, int] = {}
    colors: list[RGB] = []
    ignored = 0
    for i, f in enumerate(feats):
        if not isinstance(f, Mapping):
            raise _fail(p, f"feature {i} is not a JSON object")
        geom = f.get("geometry")
        if not isinstance(geom, Mapping) or geom.get("type") not in ("Point", "MultiPoint"):
            ignored += 1
            continue
        props = f.get("properties") or {}
        if not isinstance(props, Mapping):
            raise _fail(p, f"feature {i}: properties is not a JSON object")
        name, color = _classification(p, props)
        coords = geom.get("coordinates")
        if geom["type"] == "Point":
            coords = [coords]
        if not isinstance(coords, list):
            raise _fail(p, f"feature {i}: MultiPoint coordinates must be a list")
        idx = -1
        if name is not None:
            if name not in names:
                names[name] = len(names)
                colors.append(color if color is not None else default_class_color(name))
            idx = names[name]
        for c in coords:
            xs.append(_coordinate(p, c))
            cls.append(idx)
    if not xs:
        raise _fail(p, f"no Point or MultiPoint annotations ({len(feats)} features, {ignored} other geometries)")
    if ignored:
        log.info("%s: %d features without point geometry ignored", p.name, ignored)
    return PointAnnotations(
        points=np.asarray(xs, dtype=np.float64).reshape(-1, 2),
        class_index=np.asarray(cls, dtype=np.int64),
        names=tuple(names),
        colors=tuple(colors),
        ignored=ignored,
    )


def _feature_id(name: str | None, geometry: Mapping[str, Any]) -> str:
    """UUID derived from the class name and the exact coordinates: identical input, identical ids."""
    digest = hashlib.sha256(json.dumps([name, geometry], separators=(",", ":")).encode()).hexdigest()
    return str(uuid.uuid5(POINTS_NAMESPACE, digest))


def _check_rgb(name: str, c: Any) -> RGB:
    vals = tuple(c) if isinstance(c, (tuple, list, np.ndarray)) else ()
    if len(vals) != 3 or not all(float(v).is_integer() and 0 <= v <= 255 for v in vals):
        raise ValueError(f"colour of class {name!r} must be three integers 0-255, got {c!r}")
    r, g, b = (int(v) for v in vals)
    return r, g, b


def write_qupath_points(
    path: str | os.PathLike[str],
    points_xy: np.ndarray,
    class_names: Sequence[str | None],
    colors: Mapping[str, tuple[int, int, int]] | None = None,
    *,
    locked: bool = False,
) -> int:
    """Write points as QuPath's export does; return the number of points written.

    One annotation Feature per class in first-seen order (``None`` or ``""`` = unclassified, written without
    ``classification``): geometry ``MultiPoint``, or ``Point`` for a single point; ``properties`` with
    ``objectType`` "annotation", ``classification`` ``{"name", "color": [r, g, b]}`` (``colors[name]``, else
    :func:`default_class_color`) and ``isLocked: true`` only when ``locked``, as QuPath writes it; an ``id``
    UUID derived from the content. Coordinates are QuPath's (see the module docstring), written at full
    precision (QuPath rounds its own to 2 decimals), so reading the file back gives the same numbers.
    A FeatureCollection, gzip-compressed when ``path`` ends in ``.gz``; it appears atomically (a temporary
    file in the same folder, then ``os.replace``). Non-finite points or mismatched lengths raise ValueError,
    an unwritable location :class:`OutputError`.
    """
    pts = np.asarray(points_xy, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) != len(class_names):
        raise ValueError(f"points must be (N, 2) with one class name each; got {pts.shape} and {len(class_names)}")
    if not np.isfinite(pts).all():
        raise ValueError("points must be finite")
    given = dict(colors or {})
    groups: dict[str | None, list[int]] = {}
    for i, n in enumerate(class_names):
        if n is not None and not isinstance(n, str):
            raise ValueError(f"class names must be strings or None, got {n!r}")
        groups.setdefault(n or None, []).append(i)
    features = []
    for name, idx in groups.items():
        coords = pts[idx].tolist()
        geometry = (
            {"type": "Point", "coordinates": coords[0]}
            if len(coords) == 1
            else {"type": "MultiPoint", "coordinates": coords}
        )
        props: dict[str, Any] = {"objectType": "annotation"}
        if name is not None:
            rgb = _check_rgb(name, given[name]) if name in given else default_class_color(name)
            props["classification"] = {"name": name, "color": list(rgb)}
        if locked:
            props["isLocked"] = True
        features.append(
            {"type": "Feature", "id": _feature_id(name, geometry), "geometry": geometry, "properties": props}
        )
    text = json.dumps({"type": "FeatureCollection", "features": features}, allow_nan=False, separators=(",", ":"))
    data = text.encode("utf-8") + b"\n"
    target = Path(path)
    if target.suffix.lower() == ".gz":  # mtime=0 and no name: identical input, identical bytes
        data = gzip.compress(data, mtime=0)
    _atomic_write(target, data)
    return len(pts)


def _atomic_write(target: Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling of ``target``, then rename it onto ``target``."""
    # named like histoseg.atomic's temporaries, so its stale-temporary clean-up knows them
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, target)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {target}: {e.strerror or e}") from e
