"""Exact stitching: ownership by anchor, deterministic global ids (design.md section 4)."""

from histoseg.stitching.own import in_tissue, owned_mask, touches_halo_edge
from histoseg.stitching.stitch import BandStitcher, bands, order_within_region, stitch

__all__ = ["BandStitcher", "bands", "in_tissue", "order_within_region", "owned_mask", "stitch", "touches_halo_edge"]
