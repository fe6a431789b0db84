"""Architecture trade-off: cost, accuracy and CPU throughput of trained models, in one run.

    python -m benchmarks.tradeoff default runs/lite/lite.safetensors [--runtimes torch,openvino,onnxruntime]

For each model: its architecture; multiply-accumulates per processing megapixel counted from the model by
forward hooks (``benchmarks/limit.py``), parameters, receptive radius; MoNuSeg 2018 test (14 images) Dice,
AJI, PQ and detection F1; and the network's throughput on a real-tissue 1024² region of CMU-1 with one
thread for each runtime installed (fp32; bf16 autocast too where ``--precision auto`` would pick it), as
MP/s at the model's resolution and at 0.5 µm/px-equivalent area. The first model is the baseline: every
other row also prints its ratio to it, measured in the same run on the same CPU (printed first).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch

from histoseg.inference import NetworkPredictor
from histoseg.inference.precision import resolve_precision
from histoseg.inference.runtime import available
from histoseg.models import NucleiNet, load_model, resolve_model
from histoseg.training.evaluate import evaluate

try:  # python -m benchmarks.tradeoff, or imported from the package
    from benchmarks._common import cmu1_region
    from benchmarks.limit import count_macs
    from benchmarks.precision import cpu_line
except ModuleNotFoundError:  # python benchmarks/tradeoff.py: this folder is sys.path[0]
    from _common import cmu1_region  # type: ignore[no-redef]
    from limit import count_macs  # type: ignore[no-redef]
    from precision import cpu_line  # type: ignore[no-redef]


def gmac_per_mp(net: NucleiNet) -> float:
    size = 512
    return sum(count_macs(net, size).values()) / (size * size) * 1e6 / 1e9


def throughput(model: str, runtime: str, bf16: bool, region: np.ndarray, reps: int) -> float:
    """Network-only processing megapixels per second on ``region`` (best of ``reps`` after a warm-up)."""
    pred = NetworkPredictor(resolve_model(model), bf16=bf16, runtime=runtime)
    pred.predict(region)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        pred.predict(region)
        best = min(best, time.perf_counter() - t0)
    return float(region.shape[0] * region.shape[1] / best / 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--runtimes", default="torch,openvino,onnxruntime")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--limit", type=int, default=14, help="MoNuSeg test images (0: skip accuracy)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(cpu_line(), flush=True)
    native_bf16 = resolve_precision("auto").bf16
    region = cmu1_region(args.size)
    settings = [(rt, False) for rt in args.runtimes.split(",") if available(rt)]
    if native_bf16:
        settings.insert(1, ("torch", True))
    rows: list[dict[str, Any]] = []
    for m in args.models:
        net, card = load_model(resolve_model(m))
        arch = card.net
        row: dict[str, Any] = {
            "model": m,
            "architecture": f"w{arch.width} blocks {list(arch.blocks)} {arch.block}/{arch.decoder}/{arch.heads}",
            "gmac_per_mp": gmac_per_mp(net),
            "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
            "receptive_radius_px": card.context_radius_px,
            "mpp": card.mpp,
        }
        if args.limit:
            ev = evaluate("monuseg-test", m, limit=args.limit)["mean"]
            row.update({k: ev[k] for k in ("dice", "aji", "pq", "det_f1")})
        area = (card.mpp / 0.5) ** 2  # 0.5 µm/px-equivalent megapixels per processing megapixel
        for rt, bf in settings:
            key = f"mps_{rt}_{'bf16' if bf else 'fp32'}"
            row[key] = throughput(m, rt, bf, region, args.reps)
            row[key + "_05"] = float(row[key]) * area
        rows.append(row)
        base = rows[0]
        acc = (
            f"Dice {row['dice']:.3f} AJI {row['aji']:.3f} PQ {row['pq']:.3f} F1 {row['det_f1']:.3f}"
            if args.limit
            else "accuracy skipped"
        )
        print(
            f"{m}: {row['architecture']}, {row['gmac_per_mp']:.1f} GMAC/MP "
            f"({float(row['gmac_per_mp']) / float(base['gmac_per_mp']):.2f}x), {row['params_m']:.2f} M params, "
            f"receptive radius {row['receptive_radius_px']} px | MoNuSeg test ({args.limit}): {acc}",
            flush=True,
        )
        for rt, bf in settings:
            key = f"mps_{rt}_{'bf16' if bf else 'fp32'}"
            ratio = float(row[key]) / float(base[key])
            print(f"   {rt} {'bf16' if bf else 'fp32'}, 1 thread, {args.size}²: {row[key]:.3f} MP/s ({ratio:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
