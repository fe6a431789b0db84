"""Per-slide test-time adaptation (layer 3): knows tensors and the model card, not slides."""

from histoseg.tta.methods import METHODS, AdaptResult, TTASettings, adapt, has_slide_statistics

__all__ = ["METHODS", "AdaptResult", "TTASettings", "adapt", "has_slide_statistics"]
