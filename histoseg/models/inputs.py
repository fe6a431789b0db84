"""The network's input contract, defined once: RGB uint8 -> normalised float tensor, and stride padding.

Inference, per-slide adaptation, training statistics and training batches all feed the network through
these functions, so every path normalises (``(rgb / 255 - mean) / std``, the card's mean and std) and pads
(white, bottom and right, to a multiple of the network stride) the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np

from histoseg.models.arch import STRIDE
from histoseg.models.card import ModelCard

if TYPE_CHECKING:  # torch only for the PyTorch paths: an exported engine's worker never imports it
    import torch


def pad_to_stride(image: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3) padded with white at the bottom and right to a multiple of the network stride."""
    h, w = image.shape[:2]
    ph, pw = (-h) % STRIDE, (-w) % STRIDE
    if ph or pw:
        return np.pad(image[..., :3], ((0, ph), (0, pw), (0, 0)), constant_values=255)
    return image


def normalise(x01: torch.Tensor, card: ModelCard) -> torch.Tensor:
    """(N, 3, H, W) float RGB in [0, 1] -> the network's input (card mean and std); training batches."""
    import torch

    mean = torch.tensor(card.mean, dtype=x01.dtype).view(1, 3, 1, 1)
    std = torch.tensor(card.std, dtype=x01.dtype).view(1, 3, 1, 1)
    return (x01 - mean) / std


def input_array(images: np.ndarray | Sequence[np.ndarray], card: ModelCard) -> np.ndarray:
    """RGB uint8 (H, W, 3), (N, H, W, 3) or a list of equal-size (H, W, 3) -> (N, 3, H, W) float32 input, as a
    channels-last view (the layout PyTorch's convolutions get from ``to_input``). numpy only: exported engines
    run without torch. Bit-identical to :func:`normalise` of ``rgb / 255`` (checked over all 2^24 colours)."""
    arr = np.stack([im[..., :3] for im in images]) if isinstance(images, Sequence) else np.asarray(images)[..., :3]
    if arr.ndim == 3:
        arr = arr[None]
    n, h, w = arr.shape[:3]
    if arr.dtype == np.uint8 and n * h * w:
        # one table look-up per value (OpenCV), instead of three float passes: the table holds the same float32
        # arithmetic for each of the 256 values, so the result is the same to the last bit
        src = np.ascontiguousarray(arr).reshape(n * h, w, 3)
        x = cv2.LUT(src, _table(card)[None]).reshape(n, h, w, 3)
    else:
        mean, std = np.asarray(card.mean, np.float32), np.asarray(card.std, np.float32)
        x = (arr.astype(np.float32) / np.float32(255.0) - mean) / std
    return x.transpose(0, 3, 1, 2)


def _table(card: ModelCard) -> np.ndarray:
    """(256, 3) float32: the network input of each uint8 value per channel, ``(v / 255 - mean) / std``."""
    key = (tuple(card.mean), tuple(card.std))
    if key not in _TABLES:
        v = np.arange(256, dtype=np.float32)[:, None]
        mean, std = np.asarray(card.mean, np.float32), np.asarray(card.std, np.float32)
        _TABLES[key] = np.ascontiguousarray((v / np.float32(255.0) - mean) / std, dtype=np.float32)
    return _TABLES[key]


_TABLES: dict[tuple[tuple[float, ...], tuple[float, ...]], np.ndarray] = {}


def to_input(images: np.ndarray | Sequence[np.ndarray], card: ModelCard) -> torch.Tensor:
    """:func:`input_array` as a torch tensor (same values, same channels-last strides)."""
    import torch

    return torch.from_numpy(input_array(images, card))
