"""Accuracy of the model against the classical baseline, same datasets, same metric code, one run.

    python benchmarks/accuracy.py [--model default] [--limit N] [--dsb] [--json out.json]

Datasets: MoNuSeg 2018 test (14 tiles, 40x, instance labels) and CRCHisto validation (10 tiles, 20x, points);
with ``--dsb`` also the DSB 2018 H&E subset (instance labels, assumed 0.5 µm/px). Every image is scored on
its native grid against the untouched ground truth.

- Model: :func:`histoseg.training.evaluate.evaluate` (prediction at the model's mpp, instances brought back
  to the native grid).
- Classical baseline: ``benchmarks/classical.py`` (hematoxylin, Otsu, distance watershed; parameters tuned on
  MoNuSeg *training* images only, documented there), run at the native mpp.
- Metrics: :func:`histoseg.metrics.evaluate_instances` per image and :func:`histoseg.metrics.mean_over_images`
  (segmentation metrics averaged over images, detection counts pooled) with a 3 µm centroid radius for
  instance sets; :class:`histoseg.metrics.DetectionTally` with 3.3 µm for CRCHisto points (its 6 px at 20x).
  The radii are :data:`histoseg.training.evaluate.RADIUS_UM`, the ones ``histoseg evaluate`` uses.
- ``seconds``: wall time of the per-image loop (segmentation + scoring), dataset loading excluded, the
  definition ``evaluate`` uses; the baseline's segmentation-only time is in the JSON (``segment_seconds``).
  The machines are shared: compare the two methods within one run only.

If the model is not registered (``histoseg.models.registered_models()``) and is not a path to a
``.safetensors`` file, a note says so and only the baseline is evaluated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

try:  # python -m benchmarks.accuracy, or imported from the package
    from benchmarks.classical import DEFAULT, classical_instances
except ModuleNotFoundError:  # python benchmarks/accuracy.py: this folder is sys.path[0]
    from classical import DEFAULT, classical_instances

from histoseg.models import registered_models
from histoseg.training.evaluate import evaluate, score_dataset

DATASETS = ("monuseg-test", "crchisto-val")
COLUMNS = (("Dice", "dice"), ("AJI", "aji"), ("AJI+", "aji_plus"), ("DQ", "dq"), ("SQ", "sq"), ("PQ", "pq"))


def evaluate_classical(dataset: str, limit: int | None = None) -> dict[str, Any]:
    """The baseline on one dataset, scored by the same code as the model (``score_dataset``)."""
    res = score_dataset(dataset, lambda s: classical_instances(s.image, s.mpp), limit)
    return {**res, "model": "classical", "model_mpp": None}


def model_available(model: str) -> bool:
    """A registered name, or a path to existing weights (``resolve_model`` then checks the card)."""
    if model in registered_models():
        return True
    p = Path(model)
    return p.suffix in (".safetensors", ".json") and p.with_suffix(".safetensors").is_file()


def _fmt(v: float | None, width: int, digits: int = 3) -> str:
    return f"{v:>{width}.{digits}f}" if v is not None else f"{'-':>{width}}"


def format_table(results: list[dict[str, Any]]) -> str:
    mw = max([12, *(len(r["method"]) for r in results)])
    head = f"{'method':<{mw}} {'dataset':<14} {'n':>3} " + " ".join(f"{c:>6}" for c, _ in COLUMNS)
    head += f" {'det F1':>6} {'r µm':>4} {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for r in results:
        m = r["mean"]
        cells = " ".join(_fmt(m.get(k), 6) for _, k in COLUMNS)
        lines.append(
            f"{r['method']:<{mw}} {r['dataset']:<14} {int(m.get('n_images', 0)):>3} {cells} "
            f"{_fmt(m.get('det_f1'), 6)} {r['radius_um']:>4.1f} {_fmt(r['seconds'], 8, 1)}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="registered model name or .safetensors path")
    ap.add_argument("--limit", type=int, default=None, help="first N images of each dataset")
    ap.add_argument("--dsb", action="store_true", help="also evaluate the DSB 2018 H&E subset")
    ap.add_argument("--bf16", action="store_true", help="model inference under bf16 autocast")
    ap.add_argument("--json", type=Path, default=None, help="write the full results (per image too) here")
    args = ap.parse_args(argv)

    datasets = [*DATASETS, *(["dsb"] if args.dsb else [])]
    notes: list[str] = []
    run_model = model_available(args.model)
    if not run_model:
        known = ", ".join(registered_models()) or "none"
        notes.append(
            f"model {args.model!r} is not registered (registered: {known}) and is not a weights path: "
            "only the classical baseline is evaluated"
        )
        print(f"NOTE: {notes[-1]}", file=sys.stderr)

    results: list[dict[str, Any]] = []
    failed = False
    for ds in datasets:
        r = evaluate_classical(ds, args.limit)
        results.append({"method": "classical", **r})
        print(f"classical  {ds}: {r['seconds']:.1f} s", file=sys.stderr, flush=True)
        if run_model:
            try:
                r = evaluate(ds, args.model, args.limit, bf16=args.bf16)
            except Exception as exc:  # report and keep the baseline figures
                failed = True
                notes.append(f"model evaluation on {ds} failed: {type(exc).__name__}: {exc}")
                print(f"ERROR: {notes[-1]}", file=sys.stderr)
                continue
            results.append({"method": f"model:{r['model']}", **r})
            print(f"model      {ds}: {r['seconds']:.1f} s", file=sys.stderr, flush=True)
    order = {ds: i for i, ds in enumerate(datasets)}
    results.sort(key=lambda r: (order[r["dataset"]], r["method"] != "classical"))

    print(format_table(results))
    for n in notes:
        print(f"note: {n}")
    report = {
        "command": " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg": os.getloadavg()},
        "model_requested": args.model,
        "model_evaluated": run_model and not failed,
        "limit": args.limit,
        "classical_params": dataclasses.asdict(DEFAULT),
        "notes": notes,
        "results": results,
    }
    text = json.dumps(report, indent=2, default=float)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
        print(f"JSON written to {args.json}")
    else:
        print(json.dumps({"results": [{k: v for k, v in r.items() if k != "images"} for r in results]}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
