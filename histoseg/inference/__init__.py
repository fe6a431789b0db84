"""Dense inference of the network on arrays (layer 3)."""

from histoseg.inference.predict import DensePredictor, NetworkPredictor, run_network

__all__ = ["DensePredictor", "NetworkPredictor", "run_network"]
