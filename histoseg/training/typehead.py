"""Types on a frozen trunk (issue 14): a context type head learnt from CRCHisto's classified points while the
trunk, and so its NP/HV maps and every segmentation figure, stay exactly as they were.

    histoseg train --config configs/default-types.yaml

Why: the models trained with a type head end to end (``configs/typed*.yaml``) segmented other labs' images
worse than the untyped default (DSB 2018 H&E PQ 0.207 against 0.324, first 30 images), so the shipped default
stayed untyped and every nucleus was "class 1". Training only a head on the frozen trunk cannot change the
segmentation, and because the trunk never moves, its features can be computed once per image and view: the
whole recipe runs on a CPU in minutes. The head (:class:`histoseg.models.network.ContextTypeHead`) reads the
encoder's stride-16 and stride-8 features and the decoder's stride-4 map, because a nucleus's type is told
by its surroundings (gland, stroma, lymphocyte cluster) as much as by its own pixels.

Targets come from the trunk's own nuclei, as the pipeline will see them: each training image's NP/HV maps go
through the pipeline's watershed (the card's thresholds); a nucleus whose centroid matches a classified point
within the CRCHisto radius (3.3 µm, one-to-one) takes that class; the others give no gradient. The loss is
the class-independent BCE (one sigmoid per type, UniSeg) averaged over each nucleus's pixels, then over
nuclei, so the head learns what the pipeline reads: a nucleus's mean probability per type. Each of the eight
dihedral views of an image is its own sample (features of a rotated image, not rotated features). What is
scored and kept is the moving average of the steps' weights, its BatchNorm statistics recomputed over all
training views; every ``hold_every``-th training image is held out to choose the step (validation stays
unseen); then the per-class decision weights are fitted on all training images
(:mod:`histoseg.training.typecal`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from histoseg.errors import ConfigError
from histoseg.models.arch import TYPE_STRIDES
from histoseg.training.labels import CRCHISTO_TO_TYPES, DEFAULT_TYPES

VIEWS = 8  # dihedral views (inference.views.DIHEDRAL): the image mirrored 4 ways, and its transpose too


@dataclass
class TypeHeadConfig:
    """Every knob of a frozen-trunk type head (a config with a ``trunk`` key); see ``configs/default-types.yaml``."""

    name: str = "default"  # artifact name: OUTPUT/NAME.safetensors + NAME.json
    output: str = "runs/default-types"
    trunk: str = "default"  # the model (name or .safetensors) whose trunk and NP/HV heads are kept as they are
    types: list[str] = field(default_factory=lambda: list(DEFAULT_TYPES))
    classes: dict[str, str] = field(default_factory=lambda: dict(CRCHISTO_TO_TYPES))  # CRCHisto class -> type
    iterations: int = 1500
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 50
    batch_size: int = 4  # image views per step
    ema: float = 0.995  # the kept weights are an exponential moving average of the steps' (0: the last step's)
    val_every: int = 250  # score the held-out images every N steps; the best weights are kept
    hold_every: int = 7  # every N-th CRCHisto training image (sorted) is held out to choose the iteration
    views: int = VIEWS  # dihedral views per training image (1..8)
    limit: int | None = None  # only the first N training images (tests)
    seed: int = 0
    threads: int = 1

    @staticmethod
    def from_dict(data: dict[str, Any]) -> TypeHeadConfig:
        known = {f.name for f in TypeHeadConfig.__dataclass_fields__.values()}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown type-head config keys: {unknown}")
        cfg = TypeHeadConfig(**data)
        names_ok = all(isinstance(t, str) and t for t in cfg.types)
        if len(set(cfg.types)) != len(cfg.types) or not cfg.types or not names_ok:
            raise ConfigError("types must be a non-empty list of distinct names")
        bad = sorted(set(cfg.classes) - set(CRCHISTO_TO_TYPES))
        if bad:
            raise ConfigError(f"classes: {bad} are not CRCHisto classes ({', '.join(CRCHISTO_TO_TYPES)})")
        missing = sorted(set(cfg.classes.values()) - set(cfg.types))
        if missing:
            raise ConfigError(f"classes map to types that are not listed in types: {missing}")
        for key in ("iterations", "batch_size", "val_every", "hold_every", "threads"):
            if int(getattr(cfg, key)) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
        if not 1 <= cfg.views <= VIEWS:
            raise ConfigError(f"views must be 1..{VIEWS}, got {cfg.views}")
        if not 0.0 <= cfg.ema < 1.0:
            raise ConfigError(f"ema must be in [0, 1), got {cfg.ema}")
        if cfg.limit is not None and cfg.limit < 2:
            raise ConfigError(f"limit must be >= 2 (one image to learn from, one held out), got {cfg.limit}")
        return cfg


def is_type_head_config(data: dict[str, Any]) -> bool:
    """A training YAML that names a ``trunk`` trains a type head on it (this module), not a whole network."""
    return "trunk" in data


def load_type_head_config(path: str | Path) -> TypeHeadConfig | None:
    """The config at ``path`` when it is a type-head config, else None (``histoseg train`` then reads it as a
    ``TrainConfig``)."""
    from histoseg.training.config import read_config

    data = read_config(path)
    return TypeHeadConfig.from_dict(data) if is_type_head_config(data) else None


def view(a: np.ndarray, k: int) -> np.ndarray:
    """Dihedral view ``k`` (0..7) of an (H, W, ...) array: ``inference.views.DIHEDRAL[k]``."""
    from histoseg.inference.views import DIHEDRAL, to_view

    return to_view(a, *DIHEDRAL[k])


def instance_classes(labels: np.ndarray, points_xy: np.ndarray, classes: np.ndarray, radius_px: float) -> np.ndarray:
    """Per label id (index 0 = background) the class of the point its centroid matches (one-to-one within
    ``radius_px``, the evaluation's matcher), 0 for a nucleus that matches no classified point."""
    from histoseg.metrics import match_points

    n = int(labels.max())
    out = np.zeros(n + 1, np.int64)
    ys, xs = np.nonzero(labels)
    ids_all = labels[ys, xs]
    cnt = np.bincount(ids_all, minlength=n + 1).astype(np.float64)
    ids = np.flatnonzero(cnt[1:]) + 1
    if not len(ids) or not len(points_xy):
        return out
    cy = np.bincount(ids_all, ys, minlength=n + 1)[ids] / cnt[ids]
    cx = np.bincount(ids_all, xs, minlength=n + 1)[ids] / cnt[ids]
    keep = classes > 0
    m = match_points(points_xy[keep], np.stack([cx, cy], axis=1), radius_px)
    for ti, pi in m.pairs:
        out[ids[pi]] = classes[keep][ti]
    return out


def weighted_f1(truth: np.ndarray, pred: np.ndarray, n: int) -> float:
    """Weighted F1 over classes 0..n-1 of matched nuclei (each class's F1 weighted by its true count): the
    CRCHisto protocol's classification score on detected nuclei, by the metrics' own tally (every nucleus
    here is a matched pair)."""
    from histoseg.metrics import ClassificationTally
    from histoseg.metrics.detection import PointMatch

    k = len(truth)
    idx = np.arange(k, dtype=np.int64)
    tally = ClassificationTally(classes=tuple(range(1, n + 1)))
    tally.add_match(PointMatch(np.stack([idx, idx], axis=1), k, 0, 0), np.asarray(truth) + 1, np.asarray(pred) + 1)
    return float(tally.result().weighted_f1)


@dataclass
class _Sample:
    """One image view's frozen features (float16) and its matched nuclei: pixel rows/columns of every
    classified nucleus, each pixel's nucleus index ``inv`` into ``target`` (0-based type per nucleus)."""

    f16: Any
    f8: Any
    d4: Any
    ys: Any
    xs: Any
    inv: Any
    target: Any


def _samples(net: Any, card: Any, s: Any, lut: np.ndarray, views: int) -> list[_Sample]:
    """The views of one CRCHisto sample: features from the frozen trunk, targets from its own nuclei."""
    import torch

    from histoseg.models.inputs import pad_to_stride, to_input
    from histoseg.postprocess import WatershedParams, separate_instances
    from histoseg.training.evaluate import RADIUS_UM, model_grid

    img = model_grid(s, card)
    h, w = img.shape[:2]
    f = img.shape[1] / s.image.shape[1]
    with torch.no_grad():
        out = net(to_input(pad_to_stride(img), card))
    np_prob = torch.softmax(out["np"].float(), 1)[0, 1, :h, :w].numpy()
    hv = out["hv"].float()[0, :, :h, :w].numpy()
    params = WatershedParams(**card.postprocess) if card.postprocess else WatershedParams()
    labels = separate_instances(np_prob, hv, card.mpp, params)
    radius_px = RADIUS_UM["crchisto-val"] / card.mpp
    cls = instance_classes(labels, (s.points + 0.5) * f - 0.5, lut[s.point_classes], radius_px)
    out_views = []
    for k in range(views):
        lab = view(labels, k)
        with torch.no_grad():
            _, feats, d4, _ = net.trunk(to_input(pad_to_stride(view(img, k)), card))
        ys, xs = np.nonzero(lab)
        ids = lab[ys, xs]
        keep = cls[ids] > 0
        uniq, inv = np.unique(ids[keep], return_inverse=True)
        out_views.append(
            _Sample(
                feats[3].half(), feats[2].half(), d4.half(),
                torch.from_numpy(ys[keep]), torch.from_numpy(xs[keep]), torch.from_numpy(inv.astype(np.int64)),
                torch.from_numpy(cls[uniq] - 1),
            )
        )
    return out_views


def _pixel_outputs(head: Any, x: _Sample, logits: bool) -> Any:
    """Per pixel of the classified nuclei (pixels, C): the head's logits (``logits``) or its probabilities."""
    import torch

    s = TYPE_STRIDES["context"]  # the head's logits are on its own grid: a pixel reads its cell
    z = head(x.f16.float(), x.f8.float(), x.d4.float())[0][:, x.ys // s, x.xs // s].T  # (pixels, C)
    return z if logits else torch.sigmoid(z)


def _loss(head: Any, x: _Sample, n_types: int) -> Any:
    """Class-independent BCE per pixel, averaged over each nucleus's pixels, then over nuclei."""
    import torch
    import torch.nn.functional as F

    z = _pixel_outputs(head, x, logits=True)
    tgt = F.one_hot(x.target[x.inv], n_types).to(z.dtype)
    per_px = F.binary_cross_entropy_with_logits(z, tgt, reduction="none").sum(1)
    n = len(x.target)
    sums = torch.zeros(n, dtype=z.dtype).index_add_(0, x.inv, per_px)
    counts = torch.zeros(n, dtype=z.dtype).index_add_(0, x.inv, torch.ones_like(per_px))
    return (sums / counts).mean()


def _precise_bn(head: Any, views: list[_Sample]) -> None:
    """The head's BatchNorm running statistics := their exact averages over all training views (one pass, in
    train mode, no gradient). A step's batch is a few views, so the momentum-averaged statistics are those of
    the last few dozen views: scored with them, one checkpoint of the same run fell from 0.68 to 0.45
    held-out weighted F1."""
    import torch

    bns = [m for m in head.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    head.train()
    with torch.no_grad():
        for x in views:
            head(x.f16.float(), x.f8.float(), x.d4.float())
    for m in bns:
        m.momentum = 0.1
    head.eval()


def _score(head: Any, held: list[_Sample], n_types: int) -> float:
    """Weighted F1 of the plain highest mean probability on the held-out images' matched nuclei."""
    import torch

    truth, pred = [], []
    head.eval()
    with torch.no_grad():
        for x in held:
            if not len(x.target):
                continue
            p = _pixel_outputs(head, x, logits=False)
            n = len(x.target)
            means = torch.zeros(n, n_types).index_add_(0, x.inv, p) / torch.bincount(x.inv, minlength=n)[:, None]
            truth.append(x.target.numpy())
            pred.append(means.argmax(1).numpy())
    return weighted_f1(np.concatenate(truth), np.concatenate(pred), n_types) if truth else float("nan")


def train_type_head(cfg: TypeHeadConfig, *, progress: bool = True) -> Path:
    """Train the context type head of ``cfg.trunk`` (frozen) and write ``OUTPUT/NAME.safetensors`` with its card;
    returns the weights' path. Deterministic for a seed (one thread)."""
    import torch

    from histoseg.datasets import CRCHISTO_CLASSES, load_crchisto
    from histoseg.models import load_model, resolve_model, save_model
    from histoseg.models.network import NucleiNet
    from histoseg.training.evaluate import RADIUS_UM, crchisto_lut, typed_images
    from histoseg.training.train import warmup_cosine
    from histoseg.training.typecal import fit_type_weights
    from histoseg.training.typecard import with_types

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    torch.set_num_threads(cfg.threads)
    trunk_net, trunk_card = load_model(resolve_model(cfg.trunk))
    card = with_types(cfg, trunk_card)
    net = NucleiNet(card.net)
    state = {k: v for k, v in trunk_net.state_dict().items() if not k.startswith("tp_head.")}
    missing, _ = net.load_state_dict(state, strict=False)
    if any(not k.startswith("tp_head.") for k in missing):
        raise ConfigError(f"trunk {cfg.trunk} does not fit its own card: {missing[:3]}")
    net.eval()
    head = net.tp_head
    if head is None:  # with_types always asks for one
        raise ConfigError("the typed network has no type head")
    for p in net.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    type_of = {c: cfg.types.index(t) + 1 for c, t in cfg.classes.items()}
    lut = np.array([0] + [type_of.get(c, 0) for c in CRCHISTO_CLASSES], np.int64)  # CRCHisto class -> type (1-based)
    samples = load_crchisto("train", None)[: cfg.limit or None]
    held_idx = {i for i in range(len(samples)) if i % cfg.hold_every == cfg.hold_every - 1} or {len(samples) - 1}
    train_views: list[_Sample] = []
    held: list[_Sample] = []
    for i, s in enumerate(samples):
        if i in held_idx:
            held += _samples(net, card, s, lut, 1)
        else:
            train_views += _samples(net, card, s, lut, cfg.views)
    train_views = [x for x in train_views if len(x.target)]
    if not train_views:
        raise ConfigError("no training nucleus matched a classified point")
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_types = len(cfg.types)
    best = (-1.0, 0, {k: v.clone() for k, v in head.state_dict().items()})
    average = copy.deepcopy(head)  # the moving average of the weights: what is scored and kept
    head.train()
    log = []
    for it in range(cfg.iterations):
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(cfg.lr, cfg.warmup, cfg.iterations, it)
        batch = rng.integers(len(train_views), size=cfg.batch_size)
        loss = sum(_loss(head, train_views[j], n_types) for j in batch) / cfg.batch_size
        opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        with torch.no_grad():
            for a, p in zip(average.parameters(), head.parameters(), strict=True):
                a.mul_(cfg.ema).add_(p.detach(), alpha=1.0 - cfg.ema)
        if (it + 1) % cfg.val_every == 0 or it + 1 == cfg.iterations:
            _precise_bn(average, train_views)
            f1 = _score(average, held, n_types)
            log.append({"iteration": it + 1, "loss": round(loss.item(), 5), "held_out_weighted_f1": round(f1, 4)})
            if progress:
                print(f"type head: step {it + 1}, loss {loss.item():.4f}, held-out weighted F1 {f1:.4f}", flush=True)
            if f1 > best[0]:
                best = (f1, it + 1, {k: v.clone() for k, v in average.state_dict().items()})
    head.load_state_dict(best[2])
    head.eval()
    radius = RADIUS_UM["crchisto-val"]
    images = typed_images(net, card, samples, radius)
    weights, plain, fitted = fit_type_weights(images, crchisto_lut(card.class_names))
    card = replace(card, type_weights=weights)
    card.training["type_head"].update(
        log=log, best_iteration=best[1], held_out=[samples[i].name for i in sorted(held_idx)]
    )
    card.training["type_weights_fit"] = {
        "weights": list(weights),
        "data": f"CRCHisto training set, {len(images)} images (centroids matched within {radius} µm)",
        "objective": "weighted classification F1 (Sirinukunwattana et al. 2016), coordinate search on log-factors",
        "views": 1,
        "weighted_f1_plain": round(plain, 4),
        "weighted_f1_fitted": round(fitted, 4),
    }
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    art = save_model(net, card, out / f"{cfg.name}.safetensors")
    return art.weights
