"""Typed nuclei and point supervision, one table, one run.

    python -m benchmarks.typing [--model default|typed|PATH] [--runtime ENGINE] [--ablation-iterations N]
                                [--skip-ablation] [--device cpu|cuda|cuda:N] [--json out.json]

(Run it as a module: as a plain script its folder would come first on ``sys.path`` and its name would hide
the standard library's ``typing``.)

1. A typed model (the shipped default unless ``--model``) on CRCHisto validation (10 images, never trained
   on): detection F1 and per-class and weighted classification F1 (Sirinukunwattana et al. 2016: centroids
   matched within 6 px at 20x, i.e. 3.3 µm; classes scored on the detected nuclei), plus HoVer-Net's F_c;
   and MoNuSeg-test PQ/AJI.
2. The point-supervision ablation: the MoNuSeg training images reduced to their nuclei's centre points,
   trained from scratch with the same schedule by (a) random-walk propagation with a learned affinity,
   (b) the Voronoi + k-means pseudo-labels of Qu et al. (MIDL 2019), (c) the full instance masks; each
   scored on MoNuSeg test. The runs are seeded and resumable (``--workdir``), so an interrupted benchmark
   continues where it stopped. Short CPU schedules are indicative: compare rows within one run. ``--device cuda``
   trains them on a GPU (the runs of ``--jobs`` share it); every score is computed on the CPU.

Every figure names the CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.precision import cpu_line
from histoseg.config import ENGINE_CHOICES, check_device
from histoseg.datasets import load_crchisto
from histoseg.inference import NetworkPredictor
from histoseg.inference.quantize import CALIBRATION_SUFFIX
from histoseg.models import load_model, resolve_model
from histoseg.pipeline.calibrate import calibrate_image
from histoseg.training.config import TrainConfig
from histoseg.training.evaluate import RADIUS_UM, MapsFn, crchisto_lut, evaluate, typed_images, typing_scores
from histoseg.training.train import train

ABLATION = {
    "points + random walk": {"name": "monuseg", "labels": "points", "propagation": "randomwalk"},
    "points + Voronoi/k-means": {"name": "monuseg", "labels": "points", "propagation": "voronoi"},
    "full masks": {"name": "monuseg", "labels": "instances"},
}


def _fmt(v: float) -> str:
    return "  n/a" if not math.isfinite(v) else f"{v:.3f}"


def engine_maps(model: str, runtime: str) -> MapsFn:
    """The maps of ``runtime`` for an image, an int8 engine calibrated on that image as ``segment`` calibrates on
    a slide (``pipeline.calibrate.calibrate_image``)."""
    pred = NetworkPredictor(resolve_model(model), runtime=runtime)

    def maps(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        with tempfile.TemporaryDirectory() as tmp:
            return calibrate_image(pred, img, Path(tmp) / f"image{CALIBRATION_SUFFIX}").predict(img)

    return maps


def typed_rows(model: str, limit: int | None, runtime: str = "torch") -> dict[str, Any]:
    net, card = load_model(resolve_model(model))
    t0 = time.perf_counter()
    # the network runs once per image; every row below scores the same detections
    maps = None if runtime == "torch" else engine_maps(model, runtime)
    samples = load_crchisto("validation", None)[: limit or None]
    images = typed_images(net, card, samples, RADIUS_UM["crchisto-val"], maps=maps)
    lut = crchisto_lut(card.class_names)
    typing = typing_scores(images, card.type_weights, lut)
    typing_3um = typing_scores([im.at_radius(3.0) for im in images], card.type_weights, lut)
    # the same detections typed by the plain highest mean: what the card's type weights add, in this run
    typing_plain = typing_scores(images, None, lut) if card.type_weights else None
    mon = evaluate("monuseg-test", model, limit)["mean"]
    return {
        "model": card.name,
        "runtime": runtime,
        "types": list(card.class_names),
        "crchisto": typing,
        "crchisto_3um": typing_3um,
        "crchisto_plain": typing_plain,
        "type_weights": card.type_weights,
        "monuseg_pq": mon["pq"],
        "monuseg_aji": mon["aji"],
        "seconds": time.perf_counter() - t0,
    }


def _train_one(cfg: TrainConfig) -> tuple[str, float]:
    """Train one ablation run (in a worker process: one thread each); returns the artifact and seconds."""
    t0 = time.perf_counter()
    artifact = train(cfg, progress=False)
    return str(artifact), time.perf_counter() - t0


def ablation_rows(
    workdir: Path, iterations: int, limit: int | None, seed: int, jobs: int, device: str = "cpu"
) -> list[dict[str, Any]]:
    """Train the three supervision variants (``jobs`` at a time, one thread each, on ``device``), score each on
    MoNuSeg test (on the CPU)."""
    cfgs = []
    for ds in ABLATION.values():
        name = ds["labels"] + ("-" + ds["propagation"] if "propagation" in ds else "")
        cfgs.append(TrainConfig(name=name, output=str(workdir / name), seed=seed, iterations=iterations,
                                datasets=[ds], semantic_fraction=0.0, val_every=max(1, iterations // 4),
                                warmup=max(1, iterations // 30), threads=1, device=device))  # fmt: skip
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        done = list(pool.map(_train_one, cfgs))
    rows = []
    for label, (artifact, train_s) in zip(ABLATION, done, strict=True):
        res = evaluate("monuseg-test", artifact, limit)["mean"]
        rows.append({"supervision": label, "pq": res["pq"], "aji": res["aji"], "dice": res["dice"],
                     "train_seconds": train_s})  # fmt: skip
        print(
            f"  {label:<26} PQ {res['pq']:.4f}  AJI {res['aji']:.4f}  Dice {res['dice']:.4f}  "
            f"(trained {train_s:.0f} s)",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="a typed model: default (the shipped default), typed, a path")
    ap.add_argument("--limit", type=int, default=None, help="first N evaluation images only")
    ap.add_argument(
        "--runtime",
        default="torch",
        choices=ENGINE_CHOICES,
        help="engine of the CRCHisto rows (int8: each image calibrated on itself, as segment calibrates a slide); "
        "MoNuSeg PQ stays PyTorch's",
    )
    ap.add_argument("--ablation-iterations", type=int, default=600)
    ap.add_argument("--skip-ablation", action="store_true")
    ap.add_argument("--workdir", default="runs/typing-ablation", help="ablation runs (resumable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="ablation runs trained at once (one thread each)")
    ap.add_argument("--device", default="cpu", help="the ablation's training device: cpu, cuda or cuda:N (scores: CPU)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not args.skip_ablation:
        check_device(args.device, option="--device", here=True)  # before the typed rows' minutes, not after
    print(cpu_line(), flush=True)
    typed = typed_rows(args.model, args.limit, args.runtime)
    c = typed["crchisto"]
    print(
        f"\nModel {typed['model']} (types: {', '.join(typed['types'])}); {c['n_images']} CRCHisto validation "
        f"images, radius {c['radius_um']} µm; CRCHisto rows run by {args.runtime}"
    )
    print("| detection F1 | P | R | weighted class F1 | " + " | ".join(c["per_class_f1"]) + " | MoNuSeg PQ | AJI |")
    print("|---" * (6 + len(c["per_class_f1"])) + "|")
    print(
        f"| {_fmt(c['det_f1'])} | {_fmt(c['det_precision'])} | {_fmt(c['det_recall'])} | {_fmt(c['weighted_f1'])} | "
        + " | ".join(_fmt(v) for v in c["per_class_f1"].values())
        + f" | {_fmt(typed['monuseg_pq'])} | {_fmt(typed['monuseg_aji'])} |"
    )
    print("HoVer-Net F_c: " + ", ".join(f"{k} {_fmt(v)}" for k, v in c["hovernet_fc"].items()))
    c3 = typed["crchisto_3um"]
    print(
        f"Within 3.0 µm instead of 3.3: detection F1 {_fmt(c3['det_f1'])}, weighted class F1 {_fmt(c3['weighted_f1'])}"
    )
    plain = typed["crchisto_plain"]
    if plain is not None:
        print(
            f"Type weights {typed['type_weights']} (card; fitted on CRCHisto training images). Without them (plain "
            f"highest mean): weighted class F1 {_fmt(plain['weighted_f1'])}; "
            + ", ".join(f"{k} {_fmt(v)}" for k, v in plain["per_class_f1"].items())
        )
    result: dict[str, Any] = {"cpu": cpu_line(), "typed": typed}
    if not args.skip_ablation:
        print(
            f"\nPoint-supervision ablation: MoNuSeg train, {args.ablation_iterations} iterations from scratch "
            f"(trained on {args.device}), scored on MoNuSeg test",
            flush=True,
        )
        rows = ablation_rows(
            Path(args.workdir), args.ablation_iterations, args.limit, args.seed, args.jobs, args.device
        )
        result["ablation"] = rows
        result["ablation_iterations"] = args.ablation_iterations
        result["ablation_device"] = args.device
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
