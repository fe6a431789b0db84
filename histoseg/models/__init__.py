"""Networks, weights (safetensors) and model cards. Knows tensors, not slides.

The network itself (``NucleiNet``, ``receptive_radius``) is imported on first use (PEP 562): reading cards
and artifacts must not import torch, so a worker that runs an exported engine stays ~190 MB smaller.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from histoseg.models.arch import NetConfig
from histoseg.models.card import ModelCard
from histoseg.models.registry import ModelArtifact, load_model, registered_models, resolve_model, save_model

if TYPE_CHECKING:
    from histoseg.models.network import NucleiNet, receptive_radius

__all__ = [
    "ModelArtifact",
    "ModelCard",
    "NetConfig",
    "NucleiNet",
    "load_model",
    "receptive_radius",
    "registered_models",
    "resolve_model",
    "save_model",
]

_LAZY = {"NucleiNet", "receptive_radius"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from histoseg.models import network

        return getattr(network, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
