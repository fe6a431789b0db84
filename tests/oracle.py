"""An oracle 'model' for pipeline tests: it returns ideal NP/HV maps of known nuclei.

It knows the ground-truth label plane of a synthetic slide and answers each region with the exact crop
of maps precomputed over the whole plane, so any difference between region sizes comes from tiling,
post-processing or stitching, never from the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from histoseg.models import ModelCard, NetConfig
from histoseg.training.targets import hv_maps
from histoseg.types import Region


@dataclass
class OraclePredictor:
    labels: np.ndarray  # (H, W) ground-truth instance ids on the processing plane
    mpp: float
    max_nucleus_um: float = 15.0
    calls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._np = (self.labels > 0).astype(np.float32)
        self._hv = hv_maps(self.labels)

    def card(self) -> ModelCard:
        return ModelCard(
            name="oracle", net=NetConfig(), mpp=self.mpp, context_radius_px=0, max_nucleus_um=self.max_nucleus_um
        )

    def predict(self, image: np.ndarray, region: Region | None = None):  # type: ignore[no-untyped-def]
        if region is None:
            raise ValueError("the oracle needs the region")
        self.calls.append(region.key)
        rb = region.read
        h, w = image.shape[:2]
        npm = np.zeros((h, w), np.float32)
        hv = np.zeros((2, h, w), np.float32)
        H, W = self.labels.shape
        y0, x0 = max(rb.y, 0), max(rb.x, 0)
        y1, x1 = min(rb.y1, H), min(rb.x1, W)
        if y1 > y0 and x1 > x0:
            npm[y0 - rb.y : y1 - rb.y, x0 - rb.x : x1 - rb.x] = self._np[y0:y1, x0:x1]
            hv[:, y0 - rb.y : y1 - rb.y, x0 - rb.x : x1 - rb.x] = self._hv[:, y0:y1, x0:x1]
        return npm, hv, None
