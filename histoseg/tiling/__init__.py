"""Tissue mask and region planning (layer 2)."""

from histoseg.tiling.regions import TISSUE_CELL, network_input, plan_regions, tissue_cells
from histoseg.tiling.tissue import tissue_mask

__all__ = ["TISSUE_CELL", "network_input", "plan_regions", "tissue_cells", "tissue_mask"]
