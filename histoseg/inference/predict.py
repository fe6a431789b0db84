"""Dense prediction: an RGB array in, NP probability / HV maps / TP probabilities out.

``NetworkPredictor`` is what region tasks receive: it holds only the artifact path and device, so it
pickles cheaply to any worker, and loads the network lazily once per process.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from histoseg.models import ModelArtifact, ModelCard, NucleiNet, load_model
from histoseg.models.network import STRIDE
from histoseg.types import Region

_CACHE: dict[tuple[str, str], tuple[NucleiNet, ModelCard]] = {}
_LOCK = threading.Lock()


class DensePredictor(Protocol):
    """Anything that turns an RGB region into dense maps at the card's mpp."""

    def card(self) -> ModelCard: ...

    def predict(
        self, image: np.ndarray, region: Region | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Dense maps of ``image``; ``region`` (where the image lies in the plane) is optional context."""
        ...


def _cached_model(artifact: ModelArtifact, device: str) -> tuple[NucleiNet, ModelCard]:
    key = (str(artifact.weights), device)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = load_model(artifact, device)
        return _CACHE[key]


_CARDS: dict[str, ModelCard] = {}


def _cached_card(key: str, artifact: ModelArtifact) -> ModelCard:
    with _LOCK:
        if key not in _CARDS:
            _CARDS[key] = artifact.card()
        return _CARDS[key]


def clear_model_cache() -> None:
    with _LOCK:
        _CACHE.clear()
        _CARDS.clear()


@dataclass(frozen=True)
class NetworkPredictor:
    """Runs the trained network; ``bf16`` autocast halves CPU time at a negligible accuracy cost."""

    artifact: ModelArtifact
    device: str = "cpu"
    bf16: bool = False

    def card(self) -> ModelCard:
        """The card alone (no weights are loaded, nothing is moved to the device: planning a slide on a
        submit host without a GPU must work)."""
        return _cached_card(str(self.artifact.card_path), self.artifact)

    def predict(
        self, image: np.ndarray, region: Region | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        net, card = _cached_model(self.artifact, self.device)
        return run_network(net, card, image, device=self.device, bf16=self.bf16)


def to_tensor(image: np.ndarray, card: ModelCard) -> torch.Tensor:
    """(H, W, 3) uint8 -> normalised (1, 3, H, W) float32."""
    x = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(card.mean).view(3, 1, 1)
    std = torch.tensor(card.std).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


@torch.no_grad()
def run_network(
    net: NucleiNet, card: ModelCard, image: np.ndarray, device: str = "cpu", bf16: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One forward pass over the whole image (padded with white to the network stride, then cropped)."""
    h, w = image.shape[:2]
    ph, pw = (-h) % STRIDE, (-w) % STRIDE
    if ph or pw:
        image = np.pad(image[..., :3], ((0, ph), (0, pw), (0, 0)), constant_values=255)
    x = to_tensor(image, card).to(device)
    if device.startswith("cuda"):
        x = x.to(memory_format=torch.channels_last)
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=bf16):
        out = net(x)
    np_prob = torch.softmax(out["np"].float(), dim=1)[0, 1, :h, :w].cpu().numpy()
    hv = out["hv"].float()[0, :, :h, :w].cpu().numpy()
    tp = None
    if "tp" in out:
        tp = torch.softmax(out["tp"].float(), dim=1)[0, :, :h, :w].cpu().numpy()
    return np_prob.astype(np.float32), hv.astype(np.float32), tp
