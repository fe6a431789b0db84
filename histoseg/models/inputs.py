"""The network's input contract, defined once: RGB uint8 -> normalised float tensor, and stride padding.

Inference, per-slide adaptation, training statistics and training batches all feed the network through
these functions, so every path normalises (``(rgb / 255 - mean) / std``, the card's mean and std) and pads
(white, bottom and right, to a multiple of the network stride) the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from histoseg.models.card import ModelCard
from histoseg.models.network import STRIDE


def pad_to_stride(image: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3) padded with white at the bottom and right to a multiple of the network stride."""
    h, w = image.shape[:2]
    ph, pw = (-h) % STRIDE, (-w) % STRIDE
    if ph or pw:
        return np.pad(image[..., :3], ((0, ph), (0, pw), (0, 0)), constant_values=255)
    return image


def normalise(x01: torch.Tensor, card: ModelCard) -> torch.Tensor:
    """(N, 3, H, W) float RGB in [0, 1] -> the network's input (card mean and std)."""
    mean = torch.tensor(card.mean, dtype=x01.dtype).view(1, 3, 1, 1)
    std = torch.tensor(card.std, dtype=x01.dtype).view(1, 3, 1, 1)
    return (x01 - mean) / std


def to_input(images: np.ndarray | Sequence[np.ndarray], card: ModelCard) -> torch.Tensor:
    """RGB uint8 (H, W, 3), (N, H, W, 3) or a list of equal-size (H, W, 3) -> (N, 3, H, W) float32 input."""
    arr = np.stack([im[..., :3] for im in images]) if isinstance(images, Sequence) else np.asarray(images)[..., :3]
    if arr.ndim == 3:
        arr = arr[None]
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div_(255.0)
    return normalise(x, card)
