"""Networks, weights (safetensors) and model cards. Knows tensors, not slides."""

from histoseg.models.card import ModelCard
from histoseg.models.network import NetConfig, NucleiNet, receptive_radius
from histoseg.models.registry import ModelArtifact, load_model, registered_models, resolve_model, save_model

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
