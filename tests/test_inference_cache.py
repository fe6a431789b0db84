"""The per-process model cache is keyed by content: new weights at the same path are never served stale,
and a batch that adapts a model per slide does not grow the cache without bound."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from histoseg.inference import NetworkPredictor, eager
from histoseg.inference import predict as predict_module
from histoseg.models import ModelCard, NetConfig, NucleiNet, save_model


def _write(path: Path, seed: int) -> NetworkPredictor:
    torch.manual_seed(seed)
    net = NucleiNet(NetConfig(width=8)).eval()
    card = ModelCard(name=f"seed{seed}", net=NetConfig(width=8), mpp=0.5)
    return NetworkPredictor(save_model(net, card, path))


def test_rewritten_weights_at_the_same_path_are_reloaded(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / "slide.adapted.safetensors"
    first = _write(path, seed=1).predict(image)[0]
    again = NetworkPredictor(_write(path, seed=1).artifact).predict(image)[0]
    np.testing.assert_array_equal(first, again)  # same content: same numbers
    second = _write(path, seed=2).predict(image)[0]  # same path, new weights (a rerun's adaptation)
    assert not np.allclose(first, second)


def test_cache_is_bounded(tmp_path: Path) -> None:
    image = np.full((32, 32, 3), 200, np.uint8)
    for seed in range(predict_module.CACHE_SIZE + 3):
        _write(tmp_path / f"m{seed}.safetensors", seed).predict(image)
    assert len(eager._CACHE) <= predict_module.CACHE_SIZE
