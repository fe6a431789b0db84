"""The JSON model card that travels beside every safetensors weight file.

It states what the pipeline needs to run the network correctly (architecture, processing mpp, input
normalisation, classes and colours, context radius, largest nucleus) and what a user needs to trust it
(training data, licence, measured metrics), plus the source feature statistics for adaptation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from histoseg.atomic import atomic_file
from histoseg.config import WatershedParams
from histoseg.errors import ModelError
from histoseg.models.arch import STRIDE, SWITCH_DEFAULTS, NetConfig

CARD_FORMAT = 1
# (low, high) of every size a card sets: beyond them the network or the planned regions cannot be allocated
LIMITS: dict[str, tuple[float, float]] = {
    "mpp": (0.05, 10.0),  # µm/px of the processing plane
    "width": (1, 256),  # network base width (channels)
    "blocks": (0, 16),  # residual blocks per stage
    "n_types": (0, 64),
    "classes": (1, 64),
    "class_id": (0, 255),
    "context_radius_px": (0, 2048),
    "max_nucleus_um": (0.5, 500.0),
    "mean": (0.0, 1.0),
    "std": (1e-3, 10.0),  # > 0: a zero std divides by zero and silently gives no nuclei
    "halo_px": (0, 4096),
    "type_weight": (0.01, 100.0),  # per-class factor on a type's mean probability (postprocess.decide_types)
}


@dataclass
class ModelCard:
    name: str
    net: NetConfig
    mpp: float
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    class_names: tuple[str, ...] = ("Nucleus",)
    class_colors: tuple[tuple[int, int, int], ...] = ((200, 40, 160),)
    context_radius_px: int = 0  # theoretical receptive-field radius at processing resolution
    max_nucleus_um: float = 20.0  # largest nucleus extent seen in training (µm)
    training: dict[str, Any] = field(default_factory=dict)
    license: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    postprocess: dict[str, Any] = field(default_factory=dict)
    source_stats: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    description: str = ""
    # per-class factors on the mean type probabilities before the highest is taken (typed models only; None:
    # plain highest mean); fitted on training images by histoseg.training.typecal, recorded in training
    type_weights: tuple[float, ...] | None = None

    def halo_px(self) -> int:
        """Halo that makes stitching exact: context radius plus the largest nucleus, rounded up to the
        network stride so every region stays on the network's sampling grid."""
        need = self.context_radius_px + math.ceil(self.max_nucleus_um / self.mpp)
        return int(math.ceil(need / STRIDE) * STRIDE)

    def to_dict(self) -> dict[str, Any]:
        extra = {} if self.type_weights is None else {"type_weights": list(self.type_weights)}
        return {
            "format": CARD_FORMAT,
            "name": self.name,
            "description": self.description,
            "architecture": {"type": "NucleiNet", **self.net.to_dict()},
            "mpp": self.mpp,
            "input": {"mean": list(self.mean), "std": list(self.std), "scale": "rgb/255"},
            "classes": [
                {"id": i + 1, "name": n, "color": list(c)}
                for i, (n, c) in enumerate(zip(self.class_names, self.class_colors, strict=True))
            ],
            "context_radius_px": self.context_radius_px,
            "max_nucleus_um": self.max_nucleus_um,
            "postprocess": self.postprocess,
            **extra,
            "training": self.training,
            "license": self.license,
            "metrics": self.metrics,
            "source_stats": self.source_stats,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ModelCard:
        """Parse and validate a card (a schema with bounds, see ``LIMITS``); any violation is a ModelError."""
        card = ModelCard._parse(d)
        if card.halo_px() > LIMITS["halo_px"][1]:
            raise ModelError(
                f"malformed model card: context_radius_px + max_nucleus_um / mpp gives a {card.halo_px()} px halo "
                f"(at most {LIMITS['halo_px'][1]})"
            )
        return card

    @staticmethod
    def _parse(d: Any) -> ModelCard:
        if not isinstance(d, dict):
            raise ModelError(f"malformed model card: a JSON object is needed, got {type(d).__name__}")
        fmt = d.get("format", CARD_FORMAT)
        if fmt != CARD_FORMAT:
            raise _bad("format", f"{str(fmt)[:20]!r} is not supported (this histoseg reads {CARD_FORMAT})")
        arch = _obj(d, "architecture")
        inp = _obj(d, "input")
        classes = _list(d, "classes", 1, int(LIMITS["classes"][1]))
        parsed = [_class(c, i) for i, c in enumerate(classes)]
        if len({cid for cid, _, _ in parsed}) != len(parsed):
            raise ModelError("malformed model card: class ids must be unique")
        parsed.sort()
        blocks = _list(arch, "blocks", 4, 4, default=[1, 1, 1, 1])
        try:
            net = NetConfig(
                width=_int(arch, "width", *LIMITS["width"], default=32),
                blocks=tuple(_num(b, "architecture.blocks", *LIMITS["blocks"], integer=True) for b in blocks),  # type: ignore[arg-type]
                n_types=_int(arch, "n_types", *LIMITS["n_types"], default=0),
                **{key: str(arch.get(key, default)) for key, default in SWITCH_DEFAULTS.items()},
            )
        except ValueError as exc:
            raise ModelError(f"malformed model card: {exc}") from exc
        if net.n_types and [cid for cid, _, _ in parsed] != list(range(1, len(parsed) + 1)):
            raise _bad("classes", "of a typed model must have ids 1..n (type channel k is class k + 1)")
        if net.n_types and net.n_types != len(parsed):
            raise _bad(
                "architecture.n_types", f"is {net.n_types} but the card lists {len(parsed)} classes (one per type)"
            )
        return ModelCard(
            name=_text(d, "name"),
            description=str(d.get("description", "")),
            net=net,
            mpp=_float(d, "mpp", *LIMITS["mpp"]),
            mean=_triple(inp, "mean", *LIMITS["mean"]),
            std=_triple(inp, "std", *LIMITS["std"]),
            class_names=tuple(n for _, n, _ in parsed),
            class_colors=tuple(c for _, _, c in parsed),
            context_radius_px=_int(d, "context_radius_px", *LIMITS["context_radius_px"]),
            max_nucleus_um=_float(d, "max_nucleus_um", *LIMITS["max_nucleus_um"], default=20.0),
            postprocess=_postprocess(d.get("postprocess", {})),
            training=dict(_obj(d, "training", default={})),
            license=str(d.get("license", "")),
            metrics=dict(_obj(d, "metrics", default={})),
            source_stats=dict(_obj(d, "source_stats", default={})),
            type_weights=_type_weights(d.get("type_weights"), net.n_types),
        )

    def save(self, path: str | Path) -> None:
        """Write the card as JSON, atomically (raises OutputError)."""
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @staticmethod
    def load(path: str | Path) -> ModelCard:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError as exc:
            raise ModelError(f"model card not found: {p}") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"model card {p} is not valid JSON: {exc}") from exc
        except OSError as exc:
            raise ModelError(f"cannot read model card {p}: {exc.strerror or exc}") from exc
        return ModelCard.from_dict(data)


# --------------------------------------------------------------------------------------------- schema

_NUMBER = (int, float)


def _bad(what: str, detail: str) -> ModelError:
    return ModelError(f"malformed model card: {what} {detail}")


def _field(d: dict[str, Any], key: str, default: Any) -> Any:
    if key in d:
        return d[key]
    if default is _REQUIRED:
        raise _bad(key, "is missing")
    return default


_REQUIRED: Any = object()


def _num(v: Any, what: str, lo: float, hi: float, integer: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, _NUMBER) or (integer and isinstance(v, float) and not v.is_integer()):
        raise _bad(what, f"must be {'an integer' if integer else 'a number'}, got {v!r}")
    if not (math.isfinite(v) and lo <= v <= hi):
        raise _bad(what, f"must be between {lo:g} and {hi:g}, got {v!r}")
    return int(v) if integer else float(v)


def _float(d: dict[str, Any], key: str, lo: float, hi: float, default: Any = _REQUIRED) -> float:
    return _num(_field(d, key, default), key, lo, hi)


def _int(d: dict[str, Any], key: str, lo: float, hi: float, default: Any = _REQUIRED) -> int:
    return int(_num(_field(d, key, default), key, lo, hi, integer=True))


def _text(d: dict[str, Any], key: str) -> str:
    v = _field(d, key, _REQUIRED)
    if not isinstance(v, str) or not v.strip() or len(v) > 200:
        raise _bad(key, f"must be a non-empty text of at most 200 characters, got {v!r}")
    return v


def _obj(d: dict[str, Any], key: str, default: Any = _REQUIRED) -> dict[str, Any]:
    v = _field(d, key, default)
    if not isinstance(v, dict):
        raise _bad(key, f"must be a JSON object, got {type(v).__name__}")
    return v


def _list(d: dict[str, Any], key: str, lo: int, hi: int, default: Any = _REQUIRED) -> list[Any]:
    v = _field(d, key, default)
    if not isinstance(v, list) or not lo <= len(v) <= hi:
        raise _bad(key, f"must be a list of {lo}..{hi} items, got {v!r}"[:200])
    return v


def _triple(d: dict[str, Any], key: str, lo: float, hi: float) -> tuple[float, float, float]:
    v = _list(d, key, 3, 3)
    a, b, c = (_num(x, f"input.{key}", lo, hi) for x in v)
    return a, b, c


def _class(c: Any, i: int) -> tuple[int, str, tuple[int, int, int]]:
    if not isinstance(c, dict):
        raise _bad(f"classes[{i}]", "must be a JSON object with id, name and color")
    cid = _int(c, "id", *LIMITS["class_id"])
    name = _text(c, "name")
    color = _list(c, "color", 3, 3)
    r, g, b = (int(_num(x, f"classes[{i}].color", 0, 255, integer=True)) for x in color)
    return cid, name, (r, g, b)


def _type_weights(v: Any, n_types: int) -> tuple[float, ...] | None:
    if v is None:
        return None
    if not n_types:
        raise _bad("type_weights", "are only for a typed model (architecture.n_types > 0)")
    if not isinstance(v, list) or len(v) != n_types:
        raise _bad("type_weights", f"must be a list of {n_types} numbers (one per type), got {v!r}"[:200])
    return tuple(_num(x, "type_weights", *LIMITS["type_weight"]) for x in v)


def _postprocess(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _bad("postprocess", f"must be a JSON object, got {type(v).__name__}")
    known = {f.name for f in fields(WatershedParams)}
    unknown = sorted(set(v) - known)
    if unknown:
        raise _bad("postprocess", f"has unknown keys {unknown}; known: {', '.join(sorted(known))}")
    return {k: _num(x, f"postprocess.{k}", 0.0, 1e3) for k, x in v.items()}
