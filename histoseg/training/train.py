"""``histoseg train``: seeded, resumable multi-task training with per-interval validation.

Writes ``OUTPUT/checkpoint.pt`` (weights, affinity branch, optimiser, RNG and stage-2 relations, loaded
with ``weights_only=True``), a JSON-lines log, and the model as ``OUTPUT/<name>.safetensors`` + card: the
best by validation PQ for an untyped model; the last iteration for a typed one (validation scores only the
outlines, and the types keep learning after PQ peaks, in stage 2 above all). Finally the source feature
statistics of every BatchNorm layer go into that card.
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

from histoseg.config import check_device
from histoseg.datasets import Sample
from histoseg.errors import ConfigError
from histoseg.inference.precision import resolve_precision
from histoseg.models import ModelCard, NucleiNet, receptive_radius, save_model
from histoseg.models.inputs import to_input
from histoseg.training.config import TrainConfig
from histoseg.training.data import TrainingData, TrainingSource
from histoseg.training.distill import Teacher, distill_loss
from histoseg.training.labels import type_colors
from histoseg.training.objective import Stage, batch_loss
from histoseg.training.points import PointSupervision
from histoseg.training.stage2 import measure_relations
from histoseg.training.validate import POSTPROCESS_GRID, tune_postprocess, validate

MONUSEG_LICENSE = (
    "Weights trained on MoNuSeg 2018 training images (Kumar et al., IEEE TMI 2017), licensed CC BY-NC-SA 4.0: "
    "the weights inherit non-commercial, share-alike terms."
)
CRCHISTO_LICENSE = (
    " Also trained on CRCHisto training points (Sirinukunwattana et al., IEEE TMI 2016), released for research "
    "use only: the weights are for non-commercial research use."
)
CRCHISTO_IMAGES_LICENSE = CRCHISTO_LICENSE.replace("training points (", "training images, their labels unused (")
DATA_TEXT = {
    ("monuseg", "instances"): "MoNuSeg 2018 training set (13 images with instance polygons, 17 with binary masks only)",
    ("monuseg", "points"): "MoNuSeg 2018 training images with instance polygons, reduced to their centre points",
    ("crchisto", "points"): "CRCHisto training set (70 images, nucleus centre points with 4 classes)",
}
UNLABELED_TEXT = {
    "monuseg": "MoNuSeg 2018 training images, unlabeled (distillation crops)",
    "crchisto": "CRCHisto training images (70), unlabeled: their labels unused (distillation crops)",
}


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_card(cfg: TrainConfig, mean: tuple[float, ...], std: tuple[float, ...], max_nucleus_um: float) -> ModelCard:
    types = tuple(cfg.types)
    net_cfg = cfg.net_config(len(types))
    names = {str(d.get("name")) for d in cfg.datasets}
    data = "; ".join(
        [
            v
            for (n, lab), v in DATA_TEXT.items()
            if any(
                d.get("name") == n and d.get("labels", "points" if n == "crchisto" else "instances") == lab
                for d in cfg.datasets
            )
        ]
        + [UNLABELED_TEXT[n] for n in cfg.distill_images]
    )
    return ModelCard(
        name=cfg.name,
        net=net_cfg,
        mpp=cfg.mpp,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        class_names=types or ("Nucleus",),
        class_colors=type_colors(types) if types else ((200, 40, 160),),
        context_radius_px=receptive_radius(net_cfg),
        max_nucleus_um=max_nucleus_um,
        license=MONUSEG_LICENSE
        + (
            CRCHISTO_LICENSE
            if "crchisto" in names
            else CRCHISTO_IMAGES_LICENSE
            if "crchisto" in cfg.distill_images
            else ""
        ),
        training={"config": cfg.to_dict(), "data": data, "held_out": cfg.val_images},
    )


def lr_at(cfg: TrainConfig, it: int) -> float:
    """Learning rate at iteration ``it``: :func:`warmup_cosine` of the config's ``lr``, ``warmup``, ``iterations``."""
    return warmup_cosine(cfg.lr, cfg.warmup, cfg.iterations, it)


def warmup_cosine(lr: float, warmup: int, iterations: int, it: int) -> float:
    """Learning rate at step ``it``: linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to 0 at
    ``iterations`` (every training loop of the project)."""
    if it < warmup:
        return lr * (it + 1) / warmup
    p = (it - warmup) / max(1, iterations - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def train(cfg: TrainConfig, *, progress: bool = True) -> Path:
    """Train to ``cfg.iterations`` (resuming from a checkpoint in ``cfg.output``); returns the artifact."""
    check_device(cfg.device, option="device", here=True)  # before the datasets are read
    _seed_all(cfg.seed)
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    data = TrainingData.build(cfg)
    card = build_card(cfg, data.mean, data.std, data.max_nucleus_um)
    net = NucleiNet(card.net).to(cfg.device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    points = PointSupervision(cfg.mpp).to(cfg.device)
    bf16 = resolve_precision(cfg.precision, cfg.device).bf16
    if cfg.init:
        _load_init(net, cfg.init)
    teacher = Teacher.load(cfg.teacher, cfg.distill_weight, cfg.mpp, cfg.device) if cfg.teacher else None
    opt = torch.optim.AdamW(
        [
            {"params": list(net.parameters()), "lr_scale": 1.0},
            {"params": list(points.parameters()), "lr_scale": cfg.affinity_lr / cfg.lr},
        ],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    stage = Stage(types=data.types, type_weight=cfg.type_weight, point_target=cfg.point_target)  # type: ignore[arg-type]
    start, best = 0, -1.0
    relations_measured = False
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        # on the CPU first: a checkpoint written on a GPU resumes on a CPU-only machine, and the other way round
        # (load_state_dict copies into the network's device; the optimiser moves its state to its parameters')
        state = torch.load(ckpt, weights_only=True, map_location="cpu")
        net.load_state_dict(state["model"])
        points.load_state_dict(state.get("points", points.state_dict()))
        opt.load_state_dict(state["optim"])
        start, best = int(state["iteration"]), float(state["best"])
        rng_state = state.get("rng")
        if rng_state is not None:
            data.rng.bit_generator.state = json.loads(rng_state)
        stage.relations = _relations_from_json(state.get("relations", "{}"))
        relations_measured = bool(state.get("relations_measured", bool(stage.relations)))
    log = open(out / "log.jsonl", "a")  # noqa: SIM115
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, disable=not progress)
    t0 = time.time()
    net.train()
    for it in bar:
        if data.types and cfg.relation_from and it >= cfg.relation_from:
            if not relations_measured:  # once (also when no dataset needs a row: every type annotated)
                stage.relations = measure_relations(net, card, data.sources, data.types, cfg.device)
                relations_measured = True
                log.write(json.dumps({"iteration": it, "relations": _relations_to_json(stage.relations)}) + "\n")
            stage.relation_weight = cfg.relation_weight
        start_affinity = cfg.iterations // 2 if cfg.affinity_from is None else cfg.affinity_from
        stage.train_affinity = it >= start_affinity  # the network first learns from the image-only walk
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, it) * g["lr_scale"]
        crops = data.batch(cfg.batch_size)
        extra = data.distill_batch(cfg.distill_crops)
        loss, terms = train_step(net, points, opt, crops, data.sources, card, stage, bf16, teacher=teacher, extra=extra)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", **{k: f"{v:.3f}" for k, v in terms.items()})
        last = it + 1 == cfg.iterations
        if (it + 1) % cfg.val_every == 0 or last:
            net.eval()
            metrics = validate(net, card, data.val, cfg.device)
            net.train()
            rec = {"iteration": it + 1, "loss": float(loss.detach()), **terms, **metrics, "seconds": time.time() - t0}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if metrics.get("pq", 0.0) > best or (data.types and last):
                best = max(best, metrics.get("pq", 0.0))
                card.metrics = {"validation": {**metrics, "iteration": it + 1}}
                if stage.relations:
                    card.training["relations"] = _relations_to_json(stage.relations)
                save_model(net, card, out / f"{cfg.name}.safetensors")
            tmp = out / "checkpoint.pt.tmp"
            torch.save(
                {
                    "model": net.state_dict(),
                    "points": points.state_dict(),
                    "optim": opt.state_dict(),
                    "iteration": it + 1,
                    "best": best,
                    "rng": json.dumps(data.rng.bit_generator.state),
                    "relations": json.dumps(_relations_to_json(stage.relations)),
                    "relations_measured": relations_measured,
                },
                tmp,
            )
            tmp.replace(ckpt)
    log.close()
    return finalize(cfg, data)


def train_step(
    net: NucleiNet,
    points: PointSupervision,
    opt: torch.optim.Optimizer,
    crops: list[tuple[Sample, int]],
    sources: list[TrainingSource],
    card: ModelCard,
    stage: Stage,
    bf16: bool,
    teacher: Teacher | None = None,
    extra: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One optimiser step on a batch of crops (each with its source index); shared by train and finetune.

    With a ``teacher``, its NP/HV maps on the same crops add a distillation term (``terms["distill"]``);
    ``extra`` unlabeled crops (student image, teacher image) join the same forward pass and learn from that
    term alone."""
    device = next(net.parameters()).device
    extra = extra or []
    if extra and (teacher is None or teacher.weight <= 0):
        raise ConfigError("unlabeled distillation crops need a teacher with a positive weight")
    n = len(crops)
    images = to_input([c.image for c, _ in crops] + [s for s, _ in extra], card).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        outp = net(images.contiguous(memory_format=torch.channels_last))
    outp = {k: v.float() for k, v in outp.items()}
    labelled = {k: v[:n] for k, v in outp.items()} if extra else outp
    loss, terms = batch_loss(labelled, images[:n], crops, sources, points, stage)
    if teacher is not None and teacher.weight > 0:
        d = distill_loss(outp, teacher.targets([c.image for c, _ in crops] + [t for _, t in extra], bf16))
        loss = loss + teacher.weight * d
        terms = {**terms, "distill": float(d.detach())}
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([*net.parameters(), *points.parameters()], 5.0)
    opt.step()
    return loss, terms


def _load_init(net: NucleiNet, path: str) -> None:
    """Start from ``path``'s weights; only a type head the initial model lacks may stay freshly initialised."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"init weights {path} cannot be read: {exc}") from exc
    own = net.state_dict()
    shapes = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if shapes:
        raise ConfigError(f"init weights {path} do not fit the configured architecture (shapes differ: {shapes[:5]})")
    missing, unexpected = net.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith("tp_head.")] + list(unexpected)
    if bad:
        raise ConfigError(f"init weights {path} do not fit the configured architecture: {bad[:5]}")


def _relations_to_json(rel: dict[int, dict[str, np.ndarray]]) -> dict[str, dict[str, list[float | None]]]:
    return {
        str(k): {lab: [None if not np.isfinite(v) else round(float(v), 5) for v in row] for lab, row in rows.items()}
        for k, rows in rel.items()
    }


def _relations_from_json(text: str) -> dict[int, dict[str, np.ndarray]]:
    raw = json.loads(text)
    return {
        int(k): {
            lab: np.array([np.nan if v is None else v for v in row], dtype=np.float64) for lab, row in rows.items()
        }
        for k, rows in raw.items()
    }


def finalize(cfg: TrainConfig, data: Any) -> Path:
    """Record the post-processing thresholds and the source feature statistics of the best weights in its card.

    With ``thresholds: teacher`` a distilled model keeps its teacher's thresholds: it learnt the teacher's
    probabilities, and a threshold tuned on the two held-out images can overfit them (the distilled ``lite``,
    tuned to 0.6, lost 0.08 DSB PQ against its teacher's 0.4, and 0.006 MoNuSeg-test PQ)."""
    from histoseg.models import resolve_model
    from histoseg.models.registry import load_model
    from histoseg.training.stats import feature_statistics

    art = resolve_model(str(Path(cfg.output) / f"{cfg.name}.safetensors"))
    net, card = load_model(art, cfg.device)
    grid = POSTPROCESS_GRID
    if cfg.thresholds == "teacher" and cfg.teacher:
        teacher_card = resolve_model(cfg.teacher).card()
        grid = (teacher_card.postprocess,) if teacher_card.postprocess else grid
    params, metrics = tune_postprocess(net, card, data.val, cfg.device, grid)
    card.postprocess = params
    card.metrics = {**card.metrics, "validation_tuned": metrics}
    card.source_stats = feature_statistics(net, card, data.train_images(), cfg.device)
    card.save(art.card_path)
    return art.weights
