"""``histoseg finetune``: teach a model from a pathologist's point clicks exported by QuPath.

Each slide's points (level-0 pixels, one QuPath GeoJSON per slide) are brought to the model's processing
plane; windows around them are read from the slide and become a point-labelled training set, propagated to
dense labels by the random walk (:mod:`histoseg.training.points`). Point classes join the model's label
space: a class whose name matches one of the model's types (case-insensitive) trains that type; any other
class becomes a new type. Its type-head weights start as the mix of the existing types it co-occurs with,
measured by the model itself at the new class's points (the class-relation matrix of UniSeg), and the
existing types that the clicks do not cover are kept by those relations as soft targets, so a new
"Tumor" class learns from "Epithelial" instead of from nothing, and "Epithelial" is not forgotten.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from histoseg.datasets import Sample
from histoseg.datasets.qupath_points import PointAnnotations, qupath_to_pixel_centres, read_qupath_points
from histoseg.errors import ConfigError
from histoseg.io.open import open_slide
from histoseg.models import ModelCard, NucleiNet, receptive_radius, save_model
from histoseg.models.registry import load_model, resolve_model
from histoseg.training.augment import Augmenter
from histoseg.training.config import TrainConfig
from histoseg.training.data import TrainingData, TrainingSource
from histoseg.training.labels import DatasetSpec, type_colors
from histoseg.training.objective import Stage
from histoseg.training.points import PointSupervision
from histoseg.training.stage2 import measure_relations
from histoseg.training.stats import feature_statistics
from histoseg.training.train import lr_at, train_step
from histoseg.types import Box

WINDOW = 512
"""Side (plane pixels) of the grid cells that group points into windows read from the slide."""


@dataclass(frozen=True)
class FinetuneSettings:
    """Knobs of ``histoseg finetune`` (defaults: a few minutes on two CPU cores)."""

    iterations: int = 200
    batch_size: int = 4
    crop: int = 256
    lr: float = 5e-4
    relation_weight: float = 0.1
    seed: int = 0
    threads: int = 1
    device: str = "cpu"


def point_windows(slide: str, ann: PointAnnotations, mpp: float, slide_mpp: float | None, crop: int) -> list[Sample]:
    """Windows of the slide at ``mpp`` that hold the points, each a point-labelled Sample (classes 1-based
    indices into ``ann.names``, 0 unclassified). Grid cells of :data:`WINDOW` with a ``crop/2`` margin."""
    reader = open_slide(slide, mpp=slide_mpp)
    with reader:
        s = reader.plane_scale(mpp)
        ph, pw = reader.plane_shape(mpp)
        pts = (qupath_to_pixel_centres(ann.points) + 0.5) / s - 0.5  # QuPath: pixel c spans [c, c + 1)
        inside = (pts[:, 0] >= -0.5) & (pts[:, 1] >= -0.5) & (pts[:, 0] < pw - 0.5) & (pts[:, 1] < ph - 0.5)
        if not inside.any():
            raise ConfigError(f"none of the {len(pts)} points lies inside {slide}")
        pts, cls = pts[inside], ann.class_index[inside] + 1
        cells = sorted({(int(y // WINDOW), int(x // WINDOW)) for x, y in pts})
        out = []
        margin = crop // 2
        for cy, cx in cells:
            x0, y0 = max(0, cx * WINDOW - margin), max(0, cy * WINDOW - margin)
            x1, y1 = min(pw, (cx + 1) * WINDOW + margin), min(ph, (cy + 1) * WINDOW + margin)
            sel = (pts[:, 0] >= x0) & (pts[:, 0] < x1) & (pts[:, 1] >= y0) & (pts[:, 1] < y1)
            image = reader.read_plane(Box(x0, y0, x1 - x0, y1 - y0), mpp)
            local = pts[sel] - np.array([x0, y0], dtype=np.float64)
            out.append(
                Sample(
                    name=f"{Path(slide).name}@{x0},{y0}",
                    image=image,
                    points=local,
                    point_classes=cls[sel].astype(np.int64),
                    mpp=mpp,
                    source="qupath",
                )
            )
    return out


def _label_space(card: ModelCard, names: Sequence[str]) -> tuple[tuple[str, ...], dict[str, str]]:
    """Unified types after fine-tuning, and the file's class -> type mapping (case-insensitive match)."""
    old = tuple(card.class_names) if card.net.n_types else ()
    lower = {t.lower(): t for t in old}
    mapping, types = {}, list(old)
    for n in names:
        t = lower.get(n.lower())
        if t is None:
            t = n
            types.append(n)
            lower[n.lower()] = n
        mapping[n] = t
    return tuple(types), mapping


def finetune(
    points: Sequence[str],
    slides: Sequence[str],
    output: str | Path,
    *,
    model: str = "default",
    slide_mpp: float | None = None,
    settings: FinetuneSettings | None = None,
) -> Path:
    """Fine-tune ``model`` from QuPath point files (one per slide, same order); write ``output`` + card."""
    st = settings or FinetuneSettings()
    if len(points) != len(slides):
        raise ConfigError(f"give one points file per slide: {len(points)} points files for {len(slides)} slides")
    torch.manual_seed(st.seed)
    torch.set_num_threads(st.threads)
    base = resolve_model(model)
    net0, card0 = load_model(base, st.device)
    anns = [read_qupath_points(p) for p in points]
    names = list(dict.fromkeys(n for a in anns for n in a.names))
    if not names:
        raise ConfigError("the points files carry no classes: classify the points in QuPath before exporting")
    types, mapping = _label_space(card0, names)
    samples: list[Sample] = []
    for ann, slide in zip(anns, slides, strict=True):
        local = {i + 1: names.index(n) + 1 for i, n in enumerate(ann.names)}  # per file -> shared ids
        for s in point_windows(slide, ann, card0.mpp, slide_mpp, st.crop):
            if s.point_classes is not None:
                s.point_classes = np.array([local.get(int(c), 0) for c in s.point_classes], dtype=np.int64)
            samples.append(s)
    spec = DatasetSpec(name="qupath", labels="points", classes=mapping, share=1.0, exhaustive=False)
    source = TrainingSource(spec=spec, samples=samples, class_lookup=spec.class_lookup(names, types))
    card = _new_card(card0, types, anns, names, base.name, slides)
    net = NucleiNet(card.net).to(st.device)
    _transfer(net0, net, card0, card, source)
    rng = np.random.default_rng(st.seed)
    data = TrainingData(
        sources=[source],
        val=[],
        rng=rng,
        augmenter=Augmenter(rng, st.crop),
        semantic_fraction=0.0,
        mean=card.mean,
        std=card.std,
        max_nucleus_um=card.max_nucleus_um,
        types=types,
    )
    stage = Stage(types=types, relation_weight=st.relation_weight)
    if card0.net.n_types:  # relations of the clicked classes to the types the clicks do not cover
        stage.relations = measure_relations(net, card, [source], types, st.device)
    sup = PointSupervision(card.mpp).to(st.device)
    opt = torch.optim.AdamW(list(net.parameters()) + list(sup.parameters()), lr=st.lr, weight_decay=1e-4)
    sched = TrainConfig(iterations=st.iterations, lr=st.lr, warmup=max(1, st.iterations // 10))
    net.train()
    for it in range(st.iterations):
        for g in opt.param_groups:
            g["lr"] = lr_at(sched, it)
        train_step(net, sup, opt, data.batch(st.batch_size), [source], card, stage, bf16=False)
    net.eval()
    card.source_stats = feature_statistics(net, card, (s.image for s in samples), st.device)
    out = Path(output)
    save_model(net, card, out)
    return out


def _new_card(
    card0: ModelCard,
    types: tuple[str, ...],
    anns: Sequence[PointAnnotations],
    names: Sequence[str],
    base: str,
    slides: Sequence[str],
) -> ModelCard:
    colours = dict(zip(card0.class_names, card0.class_colors, strict=True)) if card0.net.n_types else {}
    for a in anns:
        colours.update(zip(a.names, a.colors, strict=True))
    fallback = type_colors(types)
    net_cfg = replace(card0.net, n_types=len(types))
    return ModelCard(
        name=card0.name + "-finetuned",
        net=net_cfg,
        mpp=card0.mpp,
        mean=card0.mean,
        std=card0.std,
        class_names=types,
        class_colors=tuple(colours.get(t, fallback[i]) for i, t in enumerate(types)),
        context_radius_px=receptive_radius(net_cfg),
        max_nucleus_um=card0.max_nucleus_um,
        license=card0.license + " Fine-tuned on the user's point annotations.",
        postprocess=dict(card0.postprocess),
        training={
            "base_model": base,
            "finetune": {
                "slides": [Path(s).name for s in slides],
                "classes": list(names),
                "points": int(sum(len(a.points) for a in anns)),
            },
        },
    )


@torch.no_grad()
def _transfer(net0: NucleiNet, net: NucleiNet, card0: ModelCard, card: ModelCard, source: TrainingSource) -> None:
    """Copy every shared weight; new type channels start as the relation-weighted mix of the old ones."""
    state = net.state_dict()
    for key, v in net0.state_dict().items():
        if key in state and state[key].shape == v.shape:
            state[key] = v.clone()
        elif key.startswith("tp_head.out.") and key in state:
            state[key][: v.shape[0]] = v
    net.load_state_dict(state)
    n_old = card0.net.n_types
    if not n_old or net.tp_head is None:
        return
    rows = measure_relations(net0, card0, [_as_old(source)], card0.class_names, device=str(out_device(net)))
    out = net.tp_head.out
    for k in range(n_old, card.net.n_types):
        row = rows.get(0, {}).get(str(k))
        if row is None:
            continue
        w = np.nan_to_num(row[:n_old], nan=0.0)
        if not w.sum() > 0 or not math.isfinite(float(w.sum())):
            continue
        mix = torch.tensor(w / w.sum(), dtype=out.weight.dtype, device=out.weight.device)
        out.weight[k] = (mix.view(-1, 1, 1, 1) * out.weight[:n_old]).sum(0)
        if out.bias is not None:
            out.bias[k] = (mix * out.bias[:n_old]).sum()


def out_device(net: NucleiNet) -> torch.device:
    return next(net.parameters()).device


def _as_old(source: TrainingSource) -> TrainingSource:
    """The clicks seen from the old model: no type annotated, so every clicked class gets a relation row.

    Point classes keep their new unified indices (as relation keys), the class mask is empty."""
    spec = DatasetSpec(name="qupath", labels="points", classes={}, share=1.0)
    return TrainingSource(spec=spec, samples=source.samples, class_lookup=source.class_lookup)


__all__ = ["FinetuneSettings", "finetune", "point_windows"]
