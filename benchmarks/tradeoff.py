"""Network size vs processing resolution: accuracy and CPU throughput of trained models, in one run.

    python benchmarks/tradeoff.py default runs/small-0.5/small-0.5.safetensors runs/base-0.25/base-0.25.safetensors

For each model: MoNuSeg 2018 test (14 images) Dice/AJI/PQ, and CPU throughput of the network alone on a
1024x1024 input with one thread (fp32 and bf16), converted to slide area: µm² per second is what matters
when resolutions differ, so MP/s is also given at 0.5 µm/px-equivalent. Same machine, same run.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from histoseg.inference import run_network
from histoseg.models import load_model, resolve_model
from histoseg.training.evaluate import evaluate


def net_speed(model: str, bf16: bool, reps: int = 3) -> float:
    """Network-only throughput in processing megapixels per second (1 thread, 1024² input)."""
    net, card = load_model(resolve_model(model))
    img = np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    run_network(net, card, img, bf16=bf16)
    t0 = time.perf_counter()
    for _ in range(reps):
        run_network(net, card, img, bf16=bf16)
    return reps * 1024 * 1024 / (time.perf_counter() - t0) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for m in args.models:
        card = resolve_model(m).card()
        ev = evaluate("monuseg-test", m)["mean"]
        f32, b16 = net_speed(m, False), net_speed(m, True)
        area = (card.mpp / 0.5) ** 2  # 0.5 µm/px-equivalent megapixels per processing megapixel
        rows.append({"model": m, "width": card.net.width, "mpp": card.mpp,
                     "dice": ev["dice"], "aji": ev["aji"], "pq": ev["pq"],
                     "det_f1": ev["det_f1"], "mps_fp32": f32, "mps_bf16": b16,
                     "mps05_fp32": f32 * area, "mps05_bf16": b16 * area})
        r = rows[-1]
        print(f"{m:<45} w{r['width']:<3} {r['mpp']:.2f} µm/px  Dice {r['dice']:.3f} AJI {r['aji']:.3f} "
              f"PQ {r['pq']:.3f} F1 {r['det_f1']:.3f} | net 1 thread: {f32:.2f} MP/s fp32, {b16:.2f} MP/s bf16 "
              f"= {r['mps05_fp32']:.2f} / {r['mps05_bf16']:.2f} MP/s at 0.5 µm/px", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
