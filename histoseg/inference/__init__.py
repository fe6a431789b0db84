"""Dense inference of the network on arrays (layer 3).

``run_network`` (the PyTorch engine, ``inference.eager``) is imported on first use: the predictor itself
does not import torch (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from histoseg.inference.predict import DensePredictor, NetworkPredictor

if TYPE_CHECKING:
    from histoseg.inference.eager import run_network

__all__ = ["DensePredictor", "NetworkPredictor", "run_network"]


def __getattr__(name: str) -> Any:
    if name == "run_network":
        from histoseg.inference.eager import run_network

        return run_network
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
