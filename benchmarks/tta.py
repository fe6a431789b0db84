"""Shift benchmark of per-slide test-time adaptation: every method side by side, one table per run.

    python benchmarks/tta.py [--model default] [--regions 4] [--steps 10] [--dsb-limit 30]
                             [--sections table,ablation,cost] [--cost-size 6000] [--json out.json]

Each evaluation image is treated as one slide: K crops of it (seeded) adapt the model, then the whole image
is segmented with the adapted weights. Sets:
  (a) MoNuSeg 2018 test as is (in-domain);
  (b) MoNuSeg test under controlled, seeded stain/scanner shifts of strength 1..3: HED-space scaling and
      offset of the stain concentrations, a colour gamma per channel and a Gaussian blur (see ``shift``);
  (c) the DSB 2018 H&E subset (other labs and scanners; first ``--dsb-limit`` images);
  (d) CRCHisto validation (colorectal, 20x; detection F1 only, points).
(The per-image development benchmark over real shifts, which chose the default, is ``tta_dev.py``.)
Then the ablation on shift 3 and DSB: G2P guidance on vs off (uniform step sizes) x the number of crops K,
alignment at the encoder only, BN-affine parameters only, no gate, and the session-1 form (pooled Gaussian
KL at all layers, BN affine only, no gate). Last, the cost on a real-tissue slide (``cost``).
Figures: PQ and AJI (instance sets), detection F1 (points, and instance sets), adaptation seconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from histoseg.datasets import Sample
from histoseg.metrics import DetectionTally, centroids, evaluate_instances, match_points, mean_over_images
from histoseg.models import load_model, resolve_model
from histoseg.training.evaluate import RADIUS_UM, load_dataset, model_grid, predict_native
from histoseg.tta import TTASettings, adapt

# Ruifrok-Johnston stain matrix (rows: H, E, DAB optical-density vectors) for the shift model
_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED = _HED / np.linalg.norm(_HED, axis=1, keepdims=True)
_HED_INV = np.linalg.inv(_HED)


def shift(image: np.ndarray, strength: int, seed: int) -> np.ndarray:
    """A seeded stain + scanner shift: per-stain concentration scale/offset, colour gamma, blur."""
    if strength == 0:
        return image
    rng = np.random.default_rng(seed)
    od = -np.log(np.maximum(image.astype(np.float64), 1.0) / 255.0)
    conc = od.reshape(-1, 3) @ _HED_INV
    s = 0.15 * strength
    conc[:, 0] = conc[:, 0] * (1 + rng.uniform(-s, s)) + rng.uniform(-0.05, 0.05) * strength
    conc[:, 1] = conc[:, 1] * (1 + rng.uniform(-s, s) * 1.5) + rng.uniform(-0.05, 0.05) * strength
    out = np.exp(-(conc @ _HED)).reshape(image.shape) * 255.0
    gamma = 1 + rng.uniform(-0.1, 0.1, size=3) * strength
    out = 255.0 * (np.clip(out, 0, 255) / 255.0) ** gamma
    if strength >= 2:
        out = cv2.GaussianBlur(out, (0, 0), 0.4 * (strength - 1))
    return np.clip(out, 0, 255).astype(np.uint8)


def crops_of(image: np.ndarray, k: int, crop: int, seed: int) -> list[np.ndarray]:
    """K seeded crops of one evaluation image (reflect-padded when the image is smaller than a crop); shared with
    ``tta_dev.py``."""
    h, w = image.shape[:2]
    if h < crop or w < crop:
        image = np.pad(image, ((0, max(0, crop - h)), (0, max(0, crop - w)), (0, 0)), mode="reflect")
        h, w = image.shape[:2]
    rng = np.random.default_rng(seed)
    ys, xs = rng.integers(0, h - crop + 1, k), rng.integers(0, w - crop + 1, k)
    return [image[y : y + crop, x : x + crop] for y, x in zip(ys, xs, strict=True)]


def run_set(name: str, samples: list[Sample], net: Any, card: Any, settings: TTASettings) -> dict[str, Any]:
    rows, tally, adapt_s, seg_s = [], DetectionTally(), 0.0, 0.0
    for i, s in enumerate(samples):
        # crops at the model's resolution
        img_m = model_grid(s, card)
        t0 = time.perf_counter()
        res = adapt(net, card, crops_of(img_m, settings.regions, settings.crop, seed=i), settings)
        adapt_s += time.perf_counter() - t0
        use = net
        if res.state is not None:
            use = type(net)(card.net)
            use.load_state_dict(res.state)
            use.eval()
        t0 = time.perf_counter()
        pred = predict_native(use, card, s)
        seg_s += time.perf_counter() - t0
        if s.inst is not None:
            rows.append(evaluate_instances(s.inst, pred, s.mpp, RADIUS_UM.get(name, 3.0)))
        elif s.points is not None:
            m = match_points(s.points, centroids(pred), RADIUS_UM["crchisto-val"] / s.mpp)
            tally.add_counts(m.tp, m.fp, m.fn)
    out: dict[str, Any] = {"adapt_s": adapt_s, "segment_s": seg_s, "n": len(samples)}
    if rows:
        out.update(mean_over_images(rows))
    else:
        out.update(det_f1=tally.f1, pq=float("nan"), aji=float("nan"))
    return out


def cost(size: int, settings: TTASettings, workdir: Path) -> dict[str, float]:
    """Adaptation cost on a real-tissue slide (CMU-1 tiled to ``size``²): one worker, as ``segment`` runs it.

    Segmentation with ``--tta none`` against the adaptation itself (crop sampling + ``adapt``), both with
    the gate as configured and forced (gate and tolerance 0: the full ``steps`` always run, the worst case).
    """
    try:  # python -m benchmarks.tta, or imported from the package
        from benchmarks._common import build_tissue_slide
    except ModuleNotFoundError:  # python benchmarks/tta.py: this folder is sys.path[0]
        from _common import build_tissue_slide

    from histoseg.config import SegmentConfig
    from histoseg.distributed import InProcessRunner
    from histoseg.pipeline.adapt import sample_crops
    from histoseg.pipeline.slide import default_predictor, plan_slide, segment_slide

    slide = build_tissue_slide(workdir / f"tissue_{size}.tif", size)
    config = SegmentConfig(workers=1, overwrite=True, formats=("parquet",), tta="none")
    t0 = time.perf_counter()
    segment_slide(slide, workdir / "out", config, InProcessRunner())
    seg = time.perf_counter() - t0
    predictor = default_predictor(config)
    plan = plan_slide(slide, config, predictor)
    net, card = load_model(resolve_model(config.model))
    out: dict[str, float] = {"segment_s": seg}
    for label, st in (("gated", settings), ("forced", replace(settings, gate=0.0, tolerance=0.0))):
        t0 = time.perf_counter()
        crops = sample_crops(slide, plan.tissue, plan.plane_shape, card.mpp, st)
        rep = adapt(net, card, crops, st).report
        out[f"adapt_{label}_s"] = time.perf_counter() - t0
        out[f"adapt_{label}_kept"] = float(rep["kept_source"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--regions", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=TTASettings.lr)
    ap.add_argument("--dsb-limit", type=int, default=30)
    ap.add_argument("--methods", default="none,bn,tent,g2p")
    ap.add_argument("--strengths", default="1,2,3")
    ap.add_argument("--sections", default="table,ablation,cost", help="comma list of table, ablation, cost")
    ap.add_argument("--ablation-dsb-limit", type=int, default=10, help="DSB images in the ablation")
    ap.add_argument("--cost-size", type=int, default=6000, help="real-tissue slide side for the cost; 0: skip")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    net, card = load_model(resolve_model(args.model))
    mon = load_dataset("monuseg-test")
    sets: dict[str, list[Sample]] = {"monuseg-test": mon}
    for k in [int(x) for x in args.strengths.split(",") if x]:
        sets[f"monuseg-shift{k}"] = [
            Sample(name=s.name, image=shift(s.image, k, seed=1000 * k + i), inst=s.inst, mpp=s.mpp, source=s.source)
            for i, s in enumerate(mon)
        ]
    sets["dsb"] = load_dataset("dsb")[: args.dsb_limit]
    sets["crchisto-val"] = load_dataset("crchisto-val")
    results: dict[str, dict[str, Any]] = {}
    methods = args.methods.split(",")
    sections = set(args.sections.split(","))
    for set_name, samples in sets.items():
        if "table" not in sections:
            break
        for m in methods:
            st = TTASettings(method=m, regions=args.regions, steps=args.steps, lr=args.lr)
            r = run_set(set_name, samples, net, card, st)
            results[f"{set_name}|{m}"] = r
            print(f"{set_name:<16} {m:<5} PQ {r.get('pq', float('nan')):.4f} AJI {r.get('aji', float('nan')):.4f} "
                  f"detF1 {r['det_f1']:.4f} adapt {r['adapt_s']:.1f}s seg {r['segment_s']:.1f}s", flush=True)
    if "ablation" in sections:
        variants: list[tuple[str, dict[str, Any]]] = [
            (f"{'guided' if g else 'uniform'}-K{k}", {"guided": g, "regions": k})
            for g in (True, False) for k in sorted({2, args.regions, args.regions * 2})
        ]
        variants += [
            ("encoder-layers", {"layers": "encoder"}),
            ("bn-params", {"params": "bn"}),
            ("no-gate", {"gate": 0.0}),
            ("session1-form", {"loss": "kl", "layers": "all", "params": "bn", "gate": 0.0, "lr": 0.01}),
        ]
        for set_name in [s for s in sets if "shift3" in s or s == "dsb"]:
            for label, kw in variants:
                st = replace(TTASettings(method="g2p", regions=args.regions, steps=args.steps, lr=args.lr), **kw)
                samples = sets[set_name][: args.ablation_dsb_limit] if set_name == "dsb" else sets[set_name]
                r = run_set(set_name, samples, net, card, st)
                key = f"{set_name}|g2p-{label}"
                results[key] = r
                print(f"{key:<34} PQ {r.get('pq', float('nan')):.4f} AJI {r.get('aji', float('nan')):.4f} "
                      f"detF1 {r['det_f1']:.4f} adapt {r['adapt_s']:.1f}s", flush=True)
    if "table" in sections:
        print("\nset               " + "".join(f"{m:>12}" for m in methods) + "   (PQ; detection F1 for crchisto-val)")
        for set_name in sets:
            key = "det_f1" if set_name == "crchisto-val" else "pq"
            print(f"{set_name:<18}" + "".join(f"{results[f'{set_name}|{m}'][key]:>12.4f}" for m in methods))
        print(f"{'adaptation s':<18}" + "".join(f"{sum(results[f'{s}|{m}']['adapt_s'] for s in sets):>12.1f}"
                                                for m in methods))
        shifted = [s for s in sets if s != "monuseg-test"]
        for m in methods:
            vals = [results[f"{s}|{m}"]["det_f1" if s == "crchisto-val" else "pq"] for s in shifted]
            print(f"mean over shifted sets, {m}: {np.mean(vals):.4f}")
    if args.cost_size and "cost" in sections:
        with tempfile.TemporaryDirectory() as tmp:
            c = cost(args.cost_size, TTASettings(method="g2p", regions=args.regions, steps=args.steps, lr=args.lr),
                     Path(tmp))
        results["cost"] = c
        print(f"\ncost on a {args.cost_size}² real-tissue slide, 1 worker: segmentation {c['segment_s']:.1f} s; "
              f"g2p adaptation {c['adapt_gated_s']:.1f} s as configured "
              f"({100 * c['adapt_gated_s'] / c['segment_s']:.1f}%, source kept: {bool(c['adapt_gated_kept'])}), "
              f"{c['adapt_forced_s']:.1f} s forced ({100 * c['adapt_forced_s'] / c['segment_s']:.1f}%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
