"""``histoseg train``, ``histoseg finetune`` and ``histoseg evaluate``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from histoseg.atomic import atomic_file, check_writable_target
from histoseg.config import check_device
from histoseg.errors import ConfigError
from histoseg.models.registry import check_not_a_model_source


def model_output(arg: str) -> Path:
    """``--output`` of a command that writes a model: a ``.safetensors`` path (its card goes beside it)."""
    out = Path(arg)
    if out.suffix != ".safetensors":
        raise ConfigError("--output must end in .safetensors (the card is written beside it as .json)")
    return out


def run_train(args: argparse.Namespace) -> int:
    from histoseg.training.config import TrainConfig
    from histoseg.training.train import train
    from histoseg.training.typehead import load_type_head_config, train_type_head

    head_cfg = load_type_head_config(args.config)  # a config naming a `trunk`: a type head on that frozen model
    if head_cfg is not None:
        if args.iterations is not None:
            head_cfg.iterations = args.iterations
        if args.device not in (None, "cpu"):
            raise ConfigError("a type head on a frozen trunk trains on the CPU (minutes); --device cuda is not needed")
        artifact = train_type_head(head_cfg)
        print(f"model written: {artifact} (card: {Path(artifact).with_suffix('.json')})")
        return 0
    cfg = TrainConfig.load(args.config)
    if args.iterations is not None:
        cfg.iterations = args.iterations
    if args.device is not None:  # the same recipe on a GPU (or back on the CPU) without editing its YAML
        check_device(args.device, here=True)
        cfg.device = args.device
    artifact = train(cfg)
    print(f"model written: {artifact} (card: {Path(artifact).with_suffix('.json')})")
    return 0


POINTS_SUFFIXES = (".geojson", ".json", ".geojson.gz", ".json.gz")
"""How a points file is told from a slide when the slides follow ``--points`` (QuPath exports GeoJSON)."""


def points_and_slides(points: list[str], slides: list[str]) -> tuple[list[str], list[str]]:
    """``finetune``'s points files and slides, in either order on the command line.

    ``histoseg finetune SLIDE... --points FILE...`` gives them apart; ``histoseg finetune --points FILE...
    SLIDE...`` (the order a QuPath user reads as "these clicks, on these slides") hands every name to
    ``--points``, so there the GeoJSON files (by suffix) are the points and the other names the slides, each
    in the order given."""
    if slides:
        return points, slides
    files = [p for p in points if p.lower().endswith(POINTS_SUFFIXES)]
    slides = [p for p in points if not p.lower().endswith(POINTS_SUFFIXES)]
    if not slides:
        raise ConfigError(
            "finetune needs the slides the points were clicked on: histoseg finetune SLIDE... --points FILE... "
            "--output MODEL.safetensors"
        )
    return files, slides


def run_finetune(args: argparse.Namespace) -> int:
    from histoseg.models.registry import resolve_model
    from histoseg.training.finetune import FinetuneSettings, finetune

    points, slides = points_and_slides(args.points, args.slides)
    out = model_output(args.output)
    if args.iterations < 1:
        raise ConfigError("--iterations must be >= 1")
    check_not_a_model_source(out, resolve_model(args.model))
    check_writable_target(out)
    path = finetune(
        points,
        slides,
        out,
        model=args.model,
        slide_mpp=args.slide_mpp,
        settings=FinetuneSettings(iterations=args.iterations, seed=args.seed),
    )
    print(f"fine-tuned model written: {path} (card: {path.with_suffix('.json')}); use it with --model {path}")
    return 0


_COLUMNS = ("dice", "aji", "aji_plus", "dq", "sq", "pq", "det_f1")


def run_evaluate(args: argparse.Namespace) -> int:
    from histoseg.inference.precision import resolve_precision
    from histoseg.training.evaluate import evaluate

    bf16 = resolve_precision(args.precision).bf16
    if args.json:
        check_writable_target(args.json)  # before minutes of evaluation, not after
    res = evaluate(args.dataset, args.model, limit=args.limit, bf16=bf16, views=args.views)
    rows = res["images"]
    cols = [c for c in _COLUMNS if rows and c in rows[0]] or ["det_tp", "det_fp", "det_fn"]
    width = max([len("mean")] + [len(r["image"]) for r in rows])
    print(f"{'image':<{width}}  " + "  ".join(f"{c:>8}" for c in cols))
    for r in rows:
        print(f"{r['image']:<{width}}  " + "  ".join(f"{r[c]:>8.4g}" for c in cols))
    mean = res["mean"]
    print(f"{'mean':<{width}}  " + "  ".join(f"{mean.get(c, float('nan')):>8.4f}" for c in cols))
    print(
        f"detection F1 (pooled, radius {res['radius_um']} µm): {mean['det_f1']:.4f}  "
        f"precision {mean['det_precision']:.4f}  recall {mean['det_recall']:.4f}  "
        f"[{args.dataset}, model {res['model']} at {res['model_mpp']} µm/px, {args.views} view(s), "
        f"{res['seconds']:.1f} s]"
    )
    ty = res.get("typing")
    if ty:
        per = ", ".join(f"{k} {v:.4f}" for k, v in ty["per_class_f1"].items())
        print(f"types (Sirinukunwattana et al. 2016, radius {ty['radius_um']} µm): weighted F1 {ty['weighted_f1']:.4f}"
              f"; per class: {per}")
    if args.json:
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps(res, indent=1) + "\n")
    return 0


def run_adapt(args: argparse.Namespace) -> int:
    """Plan the slide as ``segment`` would and adapt with the same function (``pipeline.adapt.adapt_slide``:
    same crops, single-threaded), then keep the adapted artifact at ``--output``."""
    from histoseg.config import SegmentConfig
    from histoseg.inference import NetworkPredictor
    from histoseg.pipeline.adapt import adapt_slide
    from histoseg.pipeline.plan import default_predictor, plan_slide

    out = model_output(args.output)
    if args.tta in ("none", "auto"):
        raise ConfigError("histoseg adapt needs a method: --tta g2p")
    config = SegmentConfig(
        model=args.model,
        slide_mpp=args.slide_mpp,
        backend=args.backend,
        tta=args.tta,
        tta_regions=args.tta_regions,
        tta_steps=args.tta_steps,
    )
    predictor = default_predictor(config)
    if not isinstance(predictor, NetworkPredictor):
        raise ConfigError("histoseg adapt needs a network model")
    check_not_a_model_source(out, predictor.artifact)  # never the model being adapted, never a shipped one
    check_writable_target(out)
    plan = plan_slide(args.slide, config, predictor)
    adapted, report = adapt_slide(plan, predictor, config, out)
    if not isinstance(adapted, NetworkPredictor) or adapted.artifact.weights == predictor.artifact.weights:
        print(f"adaptation kept the source weights ({report.get('guard', '')}); nothing written")
        return 0
    print(
        f"adapted weights: {adapted.artifact.weights} (sha256 {report['weights_sha256'][:16]}...); "
        f"loss {report.get('loss_before')} -> {report.get('loss_after')}; reuse with --model {out}"
    )
    return 0
