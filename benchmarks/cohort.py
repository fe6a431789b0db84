"""Cohort adaptation benchmark (``histoseg adapt-cohort``): one table of rows x target cohorts, one thread.

    python -m benchmarks.cohort [--steps 100] [--crop 128] [--dsb-score-limit 20] [--crc-slides 16]
                                [--sections k,table] [--json out.json]

Cohorts (the images are read from their files as ``adapt-cohort`` reads slides: tissue-grid crops, seeded):
  dsb          DSB 2018 H&E subset, split in two seeded halves: adapt on one half (unlabeled), score PQ/AJI on
               the other (its first ``--dsb-score-limit`` images, to fit the time budget);
  crchisto     adapt on ``--crc-slides`` CRCHisto training images (unlabeled), score detection F1 on the
               CRCHisto validation set (points).
Rows: source only (the shipped model), per-slide g2p (each scored image is one slide: K seeded crops of it
adapt the model, as ``benchmarks/tta.py``), alignment only (the cohort training's feature-statistics term and
source loss without any adversarial term: the ablation that shows what the adversarial terms add), output-space
adversarial (AdaptSegNet), patch representations (Tsai et al. 2019), patch representations + per-slide g2p; every
cohort row with the default ``CohortSettings`` (feature-statistics alignment included). Adaptation time: the
cohort training (one run per cohort and method, including the source statistics) or the summed per-slide
adaptation. Then MoNuSeg-test PQ of every cohort model against the source model (the in-domain cost).
``--keep-models DIR`` writes the cohort models there and scores a model already there instead of training it again
when its card records the same settings (but the device and threads): ``--train-only --device cuda`` trains them on
a GPU machine that lacks the scored images, a second run without it scores them here (adaptation time: the card's).
``--sections k`` prints the K table: k-means inertia (share of the variance left) and silhouette of the source
patch histograms for each feature set and K, the measurement behind ``CohortSettings.modes`` and ``features``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import torch

from histoseg.cohort.data import cohort_crops, source_data
from histoseg.cohort.modes import k_table
from histoseg.cohort.train import CohortSettings, adapt_cohort
from histoseg.config import data_dir
from histoseg.datasets import Sample
from histoseg.metrics import DetectionTally, centroids, evaluate_instances, match_points, mean_over_images
from histoseg.models import load_model, resolve_model
from histoseg.training.evaluate import RADIUS_UM, load_dataset, model_grid, predict_native
from histoseg.tta import TTASettings, adapt

try:  # python -m benchmarks.cohort
    from benchmarks.precision import cpu_line
    from benchmarks.tta import crops_of
except ModuleNotFoundError:  # python benchmarks/cohort.py: this folder is sys.path[0]
    from precision import cpu_line  # type: ignore[no-redef]
    from tta import crops_of  # type: ignore[no-redef]

ROWS = ("source only", "per-slide g2p", "alignment only", "output-space adv", "patch repr", "patch repr + g2p")
VARIANTS = (  # cohort models: (row, the settings' changes from the defaults)
    ("alignment only", {"method": "patch", "adv_weight": 0.0, "mode_weight": 0.0}),  # ablation: no adversarial term
    ("output-space adv", {"method": "output"}),
    ("patch repr", {"method": "patch"}),
)


def _image_files(folder: Path) -> list[Path]:
    """DSB / CRCHisto layout: one folder per image holding ``<name>.png`` (DSB: under ``images/``)."""
    out = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        for cand in (d / "images" / f"{d.name}.png", d / f"{d.name}.png"):
            if cand.is_file():
                out.append(cand)
                break
    return out


def score(samples: list[Sample], net: Any, card: Any, g2p: TTASettings | None, dataset: str) -> dict[str, float]:
    """PQ/AJI (instances) or pooled detection F1 (points) of a model, optionally adapted per image (g2p)."""
    rows, tally, adapt_s = [], DetectionTally(), 0.0
    for i, s in enumerate(samples):
        use = net
        if g2p is not None:
            img = model_grid(s, card)
            t0 = time.perf_counter()
            res = adapt(net, card, crops_of(img, g2p.regions, g2p.crop, seed=i), g2p)
            adapt_s += time.perf_counter() - t0
            if res.state is not None:
                use = type(net)(card.net)
                use.load_state_dict(res.state)
                use.eval()
        pred = predict_native(use, card, s)
        if s.inst is not None:
            rows.append(evaluate_instances(s.inst, pred, s.mpp, RADIUS_UM[dataset]))
        elif s.points is not None:
            m = match_points(s.points, centroids(pred), RADIUS_UM[dataset] / s.mpp)
            tally.add_counts(m.tp, m.fp, m.fn)
    out = {"adapt_s": adapt_s, "n": float(len(samples))}
    if rows:
        mean = mean_over_images(rows)
        out.update(pq=mean["pq"], aji=mean["aji"], det_f1=mean["det_f1"])
    else:
        out.update(det_f1=tally.f1)
    return out


def k_section(seed: int) -> list[dict[str, Any]]:
    card = resolve_model("default").card()
    data = source_data(card, 256, seed)
    maps = [s.inst for s in data.sources[0].samples if s.inst is not None]
    rows: list[dict[str, Any]] = []
    print(f"\nK table: {len(maps)} MoNuSeg training images at {card.mpp} µm/px, half-overlapping patches")
    print(f"{'patch':>6} {'features':<13} {'K':>3} {'inertia left':>13} {'silhouette':>11} {'smallest':>9}")
    for patch in (32, 64):
        for r in k_table(maps, card.mpp, patch, [2, 3, 4, 5, 6, 8], seed):
            rows.append({"patch": patch, **r})
            print(
                f"{patch:>6} {r['features']:<13} {r['k']:>3} {r['inertia_left']:>13.3f} {r['silhouette']:>11.3f} "
                f"{r['smallest_share']:>9.3f}"
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="cohort adaptation steps (CLI default: 300)")
    ap.add_argument("--crop", type=int, default=128, help="cohort crop side (CLI default: 256)")
    ap.add_argument("--crops-per-slide", type=int, default=4)
    ap.add_argument("--dsb-score-limit", type=int, default=20, help="scored DSB images (of the held-out half)")
    ap.add_argument("--crc-slides", type=int, default=16, help="CRCHisto training images of the crchisto cohort")
    ap.add_argument("--g2p-regions", type=int, default=4)
    ap.add_argument("--g2p-steps", type=int, default=10)
    ap.add_argument("--g2p-crop", type=int, default=128)
    ap.add_argument("--cohorts", default="dsb,crchisto")
    ap.add_argument("--sections", default="k,table")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cohort training device (scoring runs on the CPU)")
    ap.add_argument("--keep-models", default=None, help="folder of the cohort models: kept, and reused when they match")
    ap.add_argument("--variants", default="alignment,output-space,patch", help="cohort models to train and score")
    ap.add_argument("--train-only", action="store_true", help="train the cohort models (--keep-models), score none")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    print(cpu_line() + "; torch threads: 1")
    results: dict[str, Any] = {"args": vars(args)}
    sections = set(args.sections.split(","))
    if "k" in sections:
        results["k_table"] = k_section(args.seed)
    if "table" not in sections:
        return _finish(results, args, t_all)
    g2p = TTASettings(method="g2p", regions=args.g2p_regions, steps=args.g2p_steps, crop=args.g2p_crop)
    net0, card0 = load_model(resolve_model("default"))
    source = source_data(card0, args.crop, args.seed)
    unknown = set(args.variants.split(",")) - {row.split()[0] for row, _ in VARIANTS}
    if unknown:
        ap.error(f"unknown --variants {', '.join(sorted(unknown))}; choose from alignment, output-space, patch")
    train_only = bool(args.train_only)
    if train_only and not args.keep_models:
        ap.error("--train-only needs --keep-models (the folder the trained models go to)")
    cohorts = _cohorts(args, scored=not train_only)
    mon = [] if train_only else load_dataset("monuseg-test")
    table: dict[str, dict[str, dict[str, float]]] = {r: {} for r in ROWS}
    mon_pq: dict[str, float] = {} if train_only else {"source": score(mon, net0, card0, None, "monuseg-test")["pq"]}
    with TemporaryDirectory() as tmp:
        keep = Path(args.keep_models or tmp)
        keep.mkdir(parents=True, exist_ok=True)
        for name, (files, mpp, scored, ds) in cohorts.items():
            print(f"\n{name}: adapt on {len(files)} images, score on {len(scored)} ({ds})", flush=True)
            if not train_only:
                table["source only"][name] = score(scored, net0, card0, None, ds)
                table["per-slide g2p"][name] = score(scored, net0, card0, g2p, ds)
            st = CohortSettings(steps=args.steps, crop=args.crop, crops_per_slide=args.crops_per_slide, seed=args.seed,
                                device=args.device)  # fmt: skip
            crops, slides = cohort_crops(files, slide_mpp=mpp, crops_per_slide=st.crops_per_slide, crop=st.crop,
                                         seed=st.seed)  # fmt: skip
            for row, changes in VARIANTS:
                t0 = time.perf_counter()
                tag = row.split()[0]
                if tag not in args.variants.split(","):
                    continue
                path = keep / f"{name}-{tag}-seed{args.seed}.safetensors"
                settings = replace(st, **changes)
                seconds = _trained_seconds(path, settings, slides)
                if seconds is None:
                    adapt_cohort(crops, path, settings=settings, slides=slides, source=source)
                    seconds = time.perf_counter() - t0
                if train_only:
                    print(f"  {row:<18} ready ({seconds:.0f} s of training): {path.name}", flush=True)
                    continue
                net, card = load_model(resolve_model(str(path)))
                table[row][name] = {**score(scored, net, card, None, ds), "adapt_s": seconds}
                mon_pq[f"{name}/{tag}"] = score(mon, net, card, None, "monuseg-test")["pq"]
                if row == "patch repr":
                    r = score(scored, net, card, g2p, ds)
                    table["patch repr + g2p"][name] = {**r, "adapt_s": seconds + r["adapt_s"]}
                _progress(name, row, table[row][name])
            for row in ("source only", "per-slide g2p", "patch repr + g2p"):
                if not train_only and name in table[row]:
                    _progress(name, row, table[row][name])
    if train_only:
        return _finish(results, args, t_all)
    results.update(table=table, monuseg_pq=mon_pq)
    _print_table(table, cohorts, mon_pq, args)
    _finish(results, args, t_all)


def _cohorts(args: Any, scored: bool) -> dict[str, tuple[list[Path], float, list[Sample], str]]:
    """Each cohort's adaptation images, their mpp, the scored samples (none with ``scored=False``: a training
    machine may lack them) and the scored dataset's name."""
    nuclei = data_dir() / "nuclei"
    cohorts: dict[str, tuple[list[Path], float, list[Sample], str]] = {}
    if "dsb" in args.cohorts:
        files = _image_files(nuclei / "dsb2018-he" / "stage1_train")
        perm = np.random.default_rng(args.seed).permutation(len(files))
        adapt_half = [files[i] for i in sorted(perm[: len(files) // 2])]
        held = {files[i].stem for i in perm[len(files) // 2 :]}
        samples = [s for s in load_dataset("dsb") if s.name in held][: args.dsb_score_limit] if scored else []
        cohorts["dsb"] = (adapt_half, 0.5, samples, "dsb")
    if "crchisto" in args.cohorts:
        files = _image_files(nuclei / "crchisto" / "train")
        pick = np.random.default_rng(args.seed).permutation(len(files))[: args.crc_slides]
        samples = load_dataset("crchisto-val") if scored else []
        cohorts["crchisto"] = ([files[i] for i in sorted(pick)], 0.55, samples, "crchisto-val")
    return cohorts


def _trained_seconds(path: Path, settings: CohortSettings, slides: list[dict[str, Any]]) -> float | None:
    """The training time its card records when ``path`` holds a cohort model of these settings (the device and
    threads aside) and these slides (their fingerprints), else None: the model must be trained."""
    if not path.is_file():
        return None
    cohort = resolve_model(str(path)).card().training.get("cohort", {})
    ignore = ("device", "threads")
    have = {k: v for k, v in cohort.get("settings", {}).items() if k not in ignore}
    want = {k: v for k, v in asdict(settings).items() if k not in ignore}
    if have != want or cohort.get("slides") != json.loads(json.dumps(slides)):
        return None
    print(f"  reusing {path.name} (trained on {cohort['settings'].get('device', 'cpu')})", flush=True)
    return float(cohort.get("seconds", float("nan")))


def _progress(cohort: str, row: str, r: dict[str, float]) -> None:
    print(
        f"  {row:<18} PQ {r.get('pq', float('nan')):.4f} AJI {r.get('aji', float('nan')):.4f} "
        f"detF1 {r.get('det_f1', float('nan')):.4f} adapt {r['adapt_s']:.0f}s",
        flush=True,
    )


def _print_table(
    table: dict[str, dict[str, dict[str, float]]], cohorts: dict[str, Any], mon: dict[str, float], args: Any
) -> None:
    print(
        f"\ncohort adaptation: {args.steps} steps, batch 4+4 crops of {args.crop} px, {args.crops_per_slide} crops "
        f"per slide; per-slide g2p: {args.g2p_regions} crops of {args.g2p_crop} px, {args.g2p_steps} steps"
    )
    if "dsb" in cohorts:
        print(f"DSB scored on {len(cohorts['dsb'][2])} images of the held-out half (--dsb-score-limit)")
    head = f"{'row':<18}"
    if "dsb" in cohorts:
        head += f"{'DSB PQ':>9}{'DSB AJI':>9}{'adapt s':>9}"
    if "crchisto" in cohorts:
        head += f"{'CRC F1':>9}{'adapt s':>9}"
    print(head)
    for row in ROWS:
        if any(name not in table[row] for name in cohorts):
            continue  # a variant left out (--variants)
        line = f"{row:<18}"
        if "dsb" in cohorts:
            r = table[row]["dsb"]
            line += f"{r['pq']:>9.4f}{r['aji']:>9.4f}{r['adapt_s']:>9.0f}"
        if "crchisto" in cohorts:
            r = table[row]["crchisto"]
            line += f"{r['det_f1']:>9.4f}{r['adapt_s']:>9.0f}"
        print(line)
    print("MoNuSeg-test PQ: " + ", ".join(f"{k} {v:.4f}" for k, v in mon.items()))


def _finish(results: dict[str, Any], args: Any, t_all: float) -> None:
    print(f"total {time.perf_counter() - t_all:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
