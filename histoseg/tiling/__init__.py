"""Tissue mask and region planning (layer 2)."""

from histoseg.tiling.regions import plan_regions
from histoseg.tiling.tissue import tissue_mask

__all__ = ["plan_regions", "tissue_mask"]
