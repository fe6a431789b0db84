"""``histoseg train``: seeded, resumable multi-task training with per-interval validation.

Writes ``OUTPUT/checkpoint.pt`` (weights + optimiser, loaded with ``weights_only=True``), a JSON-lines
log, the best model by validation PQ as ``OUTPUT/<name>.safetensors`` + card, and finally the source
feature statistics of every BatchNorm layer into that card.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from histoseg.inference.precision import resolve_precision
from histoseg.models import ModelCard, NetConfig, NucleiNet, receptive_radius, save_model
from histoseg.models.inputs import normalise
from histoseg.training.augment import Batch
from histoseg.training.config import TrainConfig
from histoseg.training.data import TrainingData
from histoseg.training.losses import total_loss
from histoseg.training.validate import tune_postprocess, validate

MONUSEG_LICENSE = (
    "Weights trained on MoNuSeg 2018 training images (Kumar et al., IEEE TMI 2017), licensed CC BY-NC-SA 4.0: "
    "the weights inherit non-commercial, share-alike terms."
)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _collate(b: Batch, card: ModelCard) -> dict[str, torch.Tensor]:
    return {
        "image": normalise(torch.from_numpy(b.image), card),
        "np": torch.from_numpy(b.np_map.astype(np.int64)),
        "hv": torch.from_numpy(b.hv),
        "has_np": torch.from_numpy(b.flags["has_np"]),
        "has_inst": torch.from_numpy(b.flags["has_inst"]),
    }


def build_card(cfg: TrainConfig, mean: tuple[float, ...], std: tuple[float, ...], max_nucleus_um: float) -> ModelCard:
    net_cfg = NetConfig(width=cfg.width, blocks=tuple(cfg.blocks), n_types=0)  # type: ignore[arg-type]
    return ModelCard(
        name=cfg.name,
        net=net_cfg,
        mpp=cfg.mpp,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        class_names=("Nucleus",),
        class_colors=((200, 40, 160),),
        context_radius_px=receptive_radius(net_cfg),
        max_nucleus_um=max_nucleus_um,
        license=MONUSEG_LICENSE,
        training={
            "config": cfg.to_dict(),
            "data": "MoNuSeg 2018 training set (30 images; 13 with instance polygons, 17 with binary masks only)",
            "held_out": cfg.val_images,
        },
    )


def _lr(cfg: TrainConfig, it: int) -> float:
    if it < cfg.warmup:
        return cfg.lr * (it + 1) / cfg.warmup
    p = (it - cfg.warmup) / max(1, cfg.iterations - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def train(cfg: TrainConfig, *, progress: bool = True) -> Path:
    """Train to ``cfg.iterations`` (resuming from a checkpoint in ``cfg.output``); returns the artifact."""
    _seed_all(cfg.seed)
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    data = TrainingData.monuseg(cfg)
    card = build_card(cfg, data.mean, data.std, data.max_nucleus_um)
    net = NucleiNet(card.net).to(cfg.device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    dev_type = "cuda" if cfg.device.startswith("cuda") else "cpu"
    bf16 = resolve_precision(cfg.precision, cfg.device).bf16
    if cfg.init:
        from safetensors.torch import load_file

        net.load_state_dict(load_file(cfg.init))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, best = 0, -1.0
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start, best = int(state["iteration"]), float(state["best"])
        rng_state = state.get("rng")
        if rng_state is not None:
            data.rng.bit_generator.state = json.loads(rng_state)
    log = open(out / "log.jsonl", "a")  # noqa: SIM115
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, disable=not progress)
    t0 = time.time()
    net.train()
    for it in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, it)
        batch = _collate(data.batch(cfg.batch_size), card)
        batch = {k: v.to(cfg.device) for k, v in batch.items()}
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=bf16):
            outp = net(batch["image"].contiguous(memory_format=torch.channels_last))
        outp = {k: v.float() for k, v in outp.items()}
        loss, terms = total_loss(outp, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", **{k: f"{v:.3f}" for k, v in terms.items()})
        last = it + 1 == cfg.iterations
        if (it + 1) % cfg.val_every == 0 or last:
            net.eval()
            metrics = validate(net, card, data.val, cfg.device)
            net.train()
            rec = {"iteration": it + 1, "loss": float(loss.detach()), **terms, **metrics, "seconds": time.time() - t0}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if metrics.get("pq", 0.0) > best:
                best = metrics["pq"]
                card.metrics = {"validation": {**metrics, "iteration": it + 1}}
                save_model(net, card, out / f"{cfg.name}.safetensors")
            tmp = out / "checkpoint.pt.tmp"
            torch.save(
                {
                    "model": net.state_dict(),
                    "optim": opt.state_dict(),
                    "iteration": it + 1,
                    "best": best,
                    "rng": json.dumps(data.rng.bit_generator.state),
                },
                tmp,
            )
            tmp.replace(ckpt)
    log.close()
    return finalize(cfg, data)


def finalize(cfg: TrainConfig, data: Any) -> Path:
    """Record source feature statistics of the best weights into its card."""
    from histoseg.models import resolve_model
    from histoseg.models.registry import load_model
    from histoseg.training.stats import feature_statistics

    art = resolve_model(str(Path(cfg.output) / f"{cfg.name}.safetensors"))
    net, card = load_model(art, cfg.device)
    params, metrics = tune_postprocess(net, card, data.val, cfg.device)
    card.postprocess = params
    card.metrics = {**card.metrics, "validation_tuned": metrics}
    card.source_stats = feature_statistics(net, card, data.train_images(), cfg.device)
    card.save(art.card_path)
    return art.weights
