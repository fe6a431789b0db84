"""Per-slide test-time adaptation (layer 3): knows tensors and the model card, not slides."""

from histoseg.tta.g2p import has_slide_statistics
from histoseg.tta.methods import adapt
from histoseg.tta.settings import METHODS, AdaptResult, TTASettings

__all__ = ["METHODS", "AdaptResult", "TTASettings", "adapt", "has_slide_statistics"]
