"""``histoseg train`` and ``histoseg evaluate``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def run_train(args: argparse.Namespace) -> int:
    from histoseg.training.config import TrainConfig
    from histoseg.training.train import train

    cfg = TrainConfig.load(args.config)
    if args.iterations is not None:
        cfg.iterations = args.iterations
    artifact = train(cfg)
    print(f"model written: {artifact} (card: {Path(artifact).with_suffix('.json')})")
    return 0


_COLUMNS = ("dice", "aji", "aji_plus", "dq", "sq", "pq", "det_f1")


def run_evaluate(args: argparse.Namespace) -> int:
    from histoseg.training.evaluate import evaluate

    res = evaluate(args.dataset, args.model, limit=args.limit, bf16=args.bf16)
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
        f"[{args.dataset}, model {res['model']} at {res['model_mpp']} µm/px, {res['seconds']:.1f} s]"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0
