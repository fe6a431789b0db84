"""The PyTorch engine: a network loaded per process (LRU by content) and one forward pass over an array.

Apart from ``inference.predict`` so that importing the predictor does not import torch (see there).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch

from histoseg.inference.predict import CACHE_SIZE
from histoseg.inference.views import Maps, run_views
from histoseg.models import ModelArtifact, ModelCard, NucleiNet, load_model
from histoseg.models.inputs import pad_to_stride, to_input
from histoseg.models.typemap import TypeMap

_CACHE: OrderedDict[tuple[str, str], tuple[NucleiNet, ModelCard]] = OrderedDict()
_LOCK = threading.Lock()


def cached_model(content: str, artifact: ModelArtifact, device: str) -> tuple[NucleiNet, ModelCard]:
    """The network of ``artifact`` on ``device``, loaded once per process and content hash (LRU-bounded)."""
    key = (content, device)
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
        else:
            _CACHE[key] = load_model(artifact, device)
            while len(_CACHE) > CACHE_SIZE:
                _CACHE.popitem(last=False)
        return _CACHE[key]


def run_network(
    net: NucleiNet, card: ModelCard, image: np.ndarray, device: str = "cpu", bf16: bool = False, views: int = 1
) -> Maps:
    """One forward pass over the whole image (padded with white to the network stride, then cropped), or the
    mean of ``views`` passes over its flipped/transposed views (:mod:`histoseg.inference.views`). The type
    probabilities stay on the type head's grid (:class:`histoseg.models.typemap.TypeMap`)."""
    return run_views(lambda im: _run_once(net, card, im, device, bf16), image, views)


@torch.no_grad()
def _run_once(net: NucleiNet, card: ModelCard, image: np.ndarray, device: str, bf16: bool) -> Maps:
    h, w = image.shape[:2]
    x = to_input(pad_to_stride(image), card).to(device)
    if device.startswith("cuda"):
        x = x.to(memory_format=torch.channels_last)
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=bf16):
        out = net(x, native_types=True)
    np_prob = torch.softmax(out["np"].float(), dim=1)[0, 1, :h, :w].cpu().numpy()
    hv = out["hv"].float()[0, :, :h, :w].cpu().numpy()
    tp = None
    if "tp" in out:
        tp = TypeMap(torch.sigmoid(out["tp"].float())[0].cpu().numpy(), card.net.type_stride).crop(h, w)
    return np_prob.astype(np.float32), hv.astype(np.float32), tp
