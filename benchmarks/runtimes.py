"""Network engines side by side on the same inputs: PyTorch eager, OpenVINO, ONNX Runtime (fp32, 1 thread).

For each engine installed: seconds per region (the shipped network on a real-tissue region of CMU-1-Small-
Region, ``--size``² at 0.5 µm/px), MP/s, the largest absolute difference of the NP/HV maps from PyTorch, and
MoNuSeg-test PQ/AJI through the same post-processing (``--limit`` images; 0 skips accuracy). PyTorch eager
is the baseline measured in the same run, so the speed-ups are ratios. Prints the CPU it ran on.

    pip install 'histoseg[fast]'; python benchmarks/runtimes.py [--size 1024] [--limit 14]
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
import torch

from histoseg.datasets import Sample
from histoseg.inference import NetworkPredictor
from histoseg.inference.runtime import available
from histoseg.models import resolve_model
from histoseg.postprocess import WatershedParams, separate_instances
from histoseg.training.evaluate import score_dataset

try:  # python -m benchmarks.runtimes, or imported from the package
    from benchmarks._common import cmu1_pixels
    from benchmarks.precision import cpu_line
except ModuleNotFoundError:  # python benchmarks/runtimes.py: this folder is sys.path[0]
    from _common import cmu1_pixels
    from precision import cpu_line


def accuracy(pred: NetworkPredictor, limit: int) -> dict[str, float]:
    card = pred.card()
    params = WatershedParams(**card.postprocess)

    def predict(s: Sample) -> np.ndarray:
        h, w = s.image.shape[:2]
        f = s.mpp / card.mpp
        img = cv2.resize(s.image, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA)
        np_prob, hv, _ = pred.predict(img)
        inst = separate_instances(np_prob, hv, card.mpp, params)
        return cv2.resize(inst.astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST).astype(np.int32)

    res = score_dataset("monuseg-test", predict, limit)
    return {"pq": res["mean"]["pq"], "aji": res["mean"]["aji"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--limit", type=int, default=14, help="MoNuSeg test images scored per engine (0: none)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(cpu_line())
    tissue, mpp0 = cmu1_pixels()
    step = 0.5 / mpp0
    idx = (np.arange(args.size) * step).astype(int)
    region = np.ascontiguousarray(tissue[np.ix_(idx % tissue.shape[0], idx % tissue.shape[1])])
    art = resolve_model("default")
    base: tuple[np.ndarray, np.ndarray] | None = None
    t_base = 0.0
    for rt in ("torch", "openvino", "onnxruntime"):
        if not available(rt):
            print(f"{rt:<12} not installed")
            continue
        pred = NetworkPredictor(art, runtime=rt)
        pred.predict(region)  # warm-up (export + compile for the compiled engines)
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            np_prob, hv, _ = pred.predict(region)
            times.append(time.perf_counter() - t0)
        t = min(times)
        if base is None:
            base, t_base = (np_prob, hv), t
        diff = max(float(np.abs(np_prob - base[0]).max()), float(np.abs(hv - base[1]).max()))
        acc = accuracy(pred, args.limit) if args.limit else {}
        acc_s = f"  MoNuSeg-test PQ {acc['pq']:.4f} AJI {acc['aji']:.4f}" if acc else ""
        print(
            f"{rt:<12} {t:6.3f} s/region  {args.size**2 / 1e6 / t:5.3f} MP/s  x{t_base / t:4.2f} vs torch  "
            f"max |diff| {diff:.1e}{acc_s}",
            flush=True,
        )


if __name__ == "__main__":
    main()
