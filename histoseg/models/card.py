"""The JSON model card that travels beside every safetensors weight file.

It states what the pipeline needs to run the network correctly (architecture, processing mpp, input
normalisation, classes and colours, context radius, largest nucleus) and what a user needs to trust it
(training data, licence, measured metrics), plus the source feature statistics for adaptation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histoseg.errors import ModelError
from histoseg.models.network import STRIDE, NetConfig

CARD_FORMAT = 1


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

    def halo_px(self) -> int:
        """Halo that makes stitching exact: context radius plus the largest nucleus, rounded up to the
        network stride so every region stays on the network's sampling grid."""
        need = self.context_radius_px + math.ceil(self.max_nucleus_um / self.mpp)
        return int(math.ceil(need / STRIDE) * STRIDE)

    def to_dict(self) -> dict[str, Any]:
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
            "training": self.training,
            "license": self.license,
            "metrics": self.metrics,
            "source_stats": self.source_stats,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ModelCard:
        card = ModelCard._parse(d)
        if not (math.isfinite(card.mpp) and card.mpp > 0):
            raise ModelError(f"malformed model card: mpp must be a positive number, got {card.mpp}")
        if card.max_nucleus_um < 0 or card.context_radius_px < 0:
            raise ModelError("malformed model card: negative max_nucleus_um or context_radius_px")
        return card

    @staticmethod
    def _parse(d: dict[str, Any]) -> ModelCard:
        try:
            arch = dict(d["architecture"])
            arch.pop("type", None)
            classes = sorted(d["classes"], key=lambda c: int(c["id"]))
            return ModelCard(
                name=str(d["name"]),
                description=str(d.get("description", "")),
                net=NetConfig.from_dict(arch),
                mpp=float(d["mpp"]),
                mean=tuple(float(v) for v in d["input"]["mean"]),  # type: ignore[arg-type]
                std=tuple(float(v) for v in d["input"]["std"]),  # type: ignore[arg-type]
                class_names=tuple(str(c["name"]) for c in classes),
                class_colors=tuple(tuple(int(v) for v in c["color"]) for c in classes),  # type: ignore[misc]
                context_radius_px=int(d["context_radius_px"]),
                max_nucleus_um=float(d.get("max_nucleus_um", 20.0)),
                postprocess=dict(d.get("postprocess", {})),
                training=dict(d.get("training", {})),
                license=str(d.get("license", "")),
                metrics=dict(d.get("metrics", {})),
                source_stats=dict(d.get("source_stats", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"malformed model card: {exc!r}") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @staticmethod
    def load(path: str | Path) -> ModelCard:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError as exc:
            raise ModelError(f"model card not found: {p}") from exc
        except json.JSONDecodeError as exc:
            raise ModelError(f"model card {p} is not valid JSON: {exc}") from exc
        return ModelCard.from_dict(data)
