"""``histoseg adapt-cohort``: adapt a model once to a cohort of unlabeled slides (``histoseg.cohort``)."""

from __future__ import annotations

import argparse

COHORT_EXAMPLES = """\
examples:
  # a new scanner: adapt the shipped model to 200 unlabeled slides, then segment with it
  histoseg adapt-cohort /data/scanner2/*.svs --output models/scanner2.safetensors
  histoseg segment /data/scanner2/ -o results/ --model models/scanner2.safetensors

  # plain images without mpp metadata, output-space alignment (the AdaptSegNet baseline)
  histoseg adapt-cohort tiles/*.png --slide-mpp 0.5 --method output --output models/tiles.safetensors
"""


def add_cohort_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], formatter: type[argparse.HelpFormatter]
) -> None:
    """Register ``adapt-cohort`` on the ``histoseg`` sub-command parser."""
    from histoseg.cohort.settings import METHODS, CohortSettings
    from histoseg.config import BACKENDS

    d = CohortSettings()
    p = sub.add_parser(
        "adapt-cohort",
        help="adapt a model to a cohort of unlabeled slides (adversarial, with the source training data)",
        description="Train a cohort-adapted model from unlabeled target slides (tissue crops sampled from them, "
        "seeded) and the source training data (HISTOSEG_DATA). Resumable: rerun the same command after an "
        "interruption.",
        epilog=COHORT_EXAMPLES,
        formatter_class=formatter,
    )
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="target slides or images (unlabeled)")
    p.add_argument("--output", required=True, help="cohort model (.safetensors; the card is written beside)")
    p.add_argument("--model", default="default", help="model to start from (name or .safetensors path)")
    p.add_argument("--slide-mpp", type=float, default=None, help="µm per pixel of level 0 for slides without it")
    p.add_argument(
        "--method",
        default=d.method,
        choices=list(METHODS),
        help="patch: discriminative patch representations; output: output-space alignment",
    )
    p.add_argument(
        "--align-weight",
        type=float,
        default=d.align_weight,
        help="weight of the feature-statistics alignment of the target crops (0: adversarial terms only)",
    )
    p.add_argument("--steps", type=int, default=d.steps, help="adaptation steps (batch of 4 source + 4 target)")
    p.add_argument("--crops-per-slide", type=int, default=d.crops_per_slide, help="tissue crops sampled per slide")
    p.add_argument("--crop", type=int, default=d.crop, help="crop side at the model's mpp")
    p.add_argument("--work", default=None, help="checkpoint folder (default: <output stem>.work beside --output)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N")
    p.add_argument("--backend", default="auto", choices=list(BACKENDS), help="slide reader")


def run_adapt_cohort(args: argparse.Namespace) -> int:
    """``histoseg adapt-cohort``: check every option and the output first, sample the slides' crops, adapt."""
    from histoseg.atomic import check_writable_target
    from histoseg.cli.learn import model_output
    from histoseg.cohort.data import cohort_crops
    from histoseg.cohort.train import CohortSettings, adapt_cohort
    from histoseg.errors import ConfigError
    from histoseg.models.registry import check_not_a_model_source, resolve_model

    out = model_output(args.output)
    if args.slide_mpp is not None and not args.slide_mpp > 0:
        raise ConfigError(f"--slide-mpp must be positive, got {args.slide_mpp}")
    settings = CohortSettings(
        method=args.method,
        align_weight=args.align_weight,
        steps=args.steps,
        crop=args.crop,
        crops_per_slide=args.crops_per_slide,
        seed=args.seed,
        device=args.device,
    )
    check_not_a_model_source(out, resolve_model(args.model))
    check_writable_target(out)  # before minutes of planning and sampling
    crops, slides = cohort_crops(
        args.slides,
        model=args.model,
        slide_mpp=args.slide_mpp,
        crops_per_slide=settings.crops_per_slide,
        crop=settings.crop,
        seed=settings.seed,
        backend=args.backend,
    )
    path = adapt_cohort(crops, out, model=args.model, settings=settings, work=args.work, slides=slides)
    print(
        f"cohort model written: {path} (card: {path.with_suffix('.json')}; {len(slides)} slides, {len(crops)} "
        f"crops, {settings.method}); use it with --model {path}"
    )
    return 0
