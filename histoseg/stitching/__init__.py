"""Exact stitching: ownership by anchor, deterministic global ids (design.md section 4)."""

from histoseg.stitching.own import in_tissue, owned_mask, touches_halo_edge
from histoseg.stitching.stitch import order_within_region, stitch

__all__ = ["in_tissue", "order_within_region", "owned_mask", "stitch", "touches_halo_edge"]
