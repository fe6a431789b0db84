"""``provenance.json`` and the ``_SUCCESS`` marker of one slide's output folder (design.md section 7).

The JSON is strict (no bare ``NaN``): non-finite floats become ``"NaN"``/``"Infinity"``/``"-Infinity"``,
numpy scalars and arrays become numbers and lists, paths and other objects their ``str``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any, overload

import numpy as np

from histoseg.atomic import atomic_file

__all__ = ["SUCCESS_NAME", "jsonable", "write_provenance", "write_success"]

SUCCESS_NAME = "_SUCCESS"


@overload
def jsonable(value: Mapping[Any, Any]) -> dict[str, Any]: ...
@overload
def jsonable(value: Any) -> Any: ...


def jsonable(value: Any) -> Any:
    """Convert ``value`` recursively into plain JSON types, NaN/Inf as strings (a mapping stays a ``dict``)."""
    if value is None or isinstance(value, (bool, str, int)) and not isinstance(value, np.generic):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((jsonable(v) for v in value), key=repr)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, PurePath):
        return os.fspath(value)
    return str(value)


def write_provenance(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Write ``record`` as indented, strict JSON to ``path``, atomically."""
    text = json.dumps(jsonable(record), indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_success(folder: str | os.PathLike[str], record: Mapping[str, Any] | None = None) -> Path:
    """Write ``folder/_SUCCESS`` (UTC completion time); call it after every other output is in place.

    With ``record`` (what the outputs certify: slide, settings) the marker is JSON with ``completed`` added.
    """
    target = Path(folder) / SUCCESS_NAME
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    text = stamp + "\n"
    if record is not None:
        text = json.dumps(jsonable({"completed": stamp, **record}), indent=2, allow_nan=False) + "\n"
    with atomic_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return target
