"""What identifies a slide's results: the slide file's fingerprint, the predictor's identity and the hash of a
settings record (used by the region store and by ``_SUCCESS``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from histoseg.inference import DensePredictor, NetworkPredictor
from histoseg.inference.quantize import calibration_tag

FULL_HASH_LIMIT = 512 << 20  # slides above this size get a partial fingerprint (documented in provenance)

__all__ = ["FULL_HASH_LIMIT", "predictor_identity", "settings_hash", "slide_fingerprint"]


def slide_fingerprint(path: str | Path) -> dict[str, Any]:
    """SHA-256 of the slide file (whole file up to 512 MB; beyond, size + first/last 64 MB).

    A folder slide (``.ome.zarr``) hashes the relative path and content of every file, in sorted order
    (beyond 512 MB in all: relative paths and sizes only).
    """
    p = Path(path)
    if p.is_dir():
        return _folder_fingerprint(p)
    size = p.stat().st_size
    h = hashlib.sha256()
    with open(p, "rb") as f:
        if size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
            kind = "sha256"
        else:
            h.update(str(size).encode())
            h.update(f.read(64 << 20))
            f.seek(size - (64 << 20))
            h.update(f.read(64 << 20))
            kind = "sha256-partial(size,first64MB,last64MB)"
    return {"kind": kind, "hex": h.hexdigest(), "size": size}


def _folder_fingerprint(folder: Path) -> dict[str, Any]:
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    sizes = [f.stat().st_size for f in files]
    whole = sum(sizes) <= FULL_HASH_LIMIT
    h = hashlib.sha256()
    for f, size in zip(files, sizes, strict=True):
        h.update(f"{f.relative_to(folder).as_posix()}\0{size}\0".encode())
        if whole:
            h.update(f.read_bytes())
    kind = "sha256-folder" if whole else "sha256-folder-partial(names,sizes)"
    return {"kind": kind, "hex": h.hexdigest(), "size": sum(sizes)}


def predictor_identity(predictor: DensePredictor) -> dict[str, Any] | None:
    """What identifies a predictor's outputs, or None when nothing does (then nothing is reused).

    A predictor may define ``fingerprint() -> str``; a ``NetworkPredictor`` is identified by the SHA-256
    of its weights and card, its device, ``bf16``, its runtime, its views and an int8 engine's calibration
    crops (all change the numbers).
    """
    custom = getattr(predictor, "fingerprint", None)
    if callable(custom):
        return {"kind": type(predictor).__qualname__, "fingerprint": str(custom())}
    if isinstance(predictor, NetworkPredictor):
        art = predictor.artifact
        return {
            "kind": "network",
            "weights_sha256": art.sha256(),
            "card_sha256": hashlib.sha256(art.card_path.read_bytes()).hexdigest(),
            "device": predictor.device,
            "bf16": predictor.bf16,
            "runtime": predictor.runtime,
            **({"views": predictor.views} if predictor.views != 1 else {}),  # absent at 1: old stores stay valid
            **({"calibration": calibration_tag(Path(predictor.calibration))} if predictor.calibration else {}),
        }
    return None


def settings_hash(settings: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``settings``."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()
