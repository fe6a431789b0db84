"""Network engines side by side on the same inputs, one thread: PyTorch eager, OpenVINO and ONNX Runtime in fp32
and int8 (post-training static quantisation calibrated on MoNuSeg training crops), and ``torch.compile``.

For each engine installed: the one-off preparation (ONNX export, int8 calibration, or compilation; ``prep``, from
an empty cache), seconds per region (the shipped network on a real-tissue region of CMU-1-Small-Region,
``--size``² at 0.5 µm/px, best of ``--reps`` rounds that visit every engine in turn, so a busy machine slows all
alike), wall and CPU seconds (one thread: equal on an idle machine, and CPU time stays fair on a shared one),
MP/s and the speed ratio to PyTorch eager from CPU time, both measured in the same run, the largest absolute
difference of the NP/HV maps from PyTorch eager, and MoNuSeg-test (or ``--dataset dsb``) PQ/AJI through the
same post-processing (``--limit`` images; 0 skips accuracy) with the PQ change against eager. The issue's rule
for a default: faster, and PQ no more than 0.005 below PyTorch eager. Prints the CPU it ran on.
``--calibration slide`` calibrates the int8 engines as ``segment`` does, on each scored image itself (and the
speed region on itself): the figures of ``--runtime auto``'s int8 on x86 CPUs without native bf16.

    python -m benchmarks.runtimes [--size 1024] [--limit 14] [--precision fp32|bf16] [--dataset monuseg-test|dsb]
                                  [--calibration monuseg|slide] [--engines torch,openvino,openvino-int8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np
import torch

from histoseg.config import ENGINE_CHOICES
from histoseg.datasets import Sample
from histoseg.inference import NetworkPredictor
from histoseg.inference.eager import run_network
from histoseg.inference.precision import cpu_native_bf16
from histoseg.inference.predict import DensePredictor
from histoseg.inference.quantize import CALIBRATION_SUFFIX
from histoseg.inference.runtime import CACHE_ENV, available
from histoseg.inference.views import Maps
from histoseg.models import ModelArtifact, ModelCard, NucleiNet, load_model, resolve_model
from histoseg.pipeline.calibrate import calibrate_image
from histoseg.postprocess import WatershedParams, separate_instances
from histoseg.training.evaluate import score_dataset

try:  # python -m benchmarks.runtimes, or imported from the package
    from benchmarks._common import cmu1_pixels
    from benchmarks.precision import cpu_line
except ModuleNotFoundError:  # python benchmarks/runtimes.py: this folder is sys.path[0]
    from _common import cmu1_pixels  # type: ignore[no-redef]
    from precision import cpu_line  # type: ignore[no-redef]

ENGINES = (*ENGINE_CHOICES, "torch-compile")  # every engine, and torch.compile as a benchmark row
PQ_TOLERANCE = 0.005  # the rule: a faster engine may cost at most this much MoNuSeg-test PQ


class CompiledPredictor:
    """PyTorch with ``torch.compile`` (inductor, CPU), for the benchmark only: not a ``--runtime`` choice."""

    def __init__(self, artifact: ModelArtifact) -> None:
        net, self._card = load_model(artifact)
        self._net = cast(NucleiNet, torch.compile(net))

    def card(self) -> ModelCard:
        return self._card

    def predict(self, image: np.ndarray, region: Any = None) -> Maps:
        return run_network(self._net, self._card, image)


def calibrated_on(pred: DensePredictor, image: np.ndarray, folder: Path) -> DensePredictor:
    """``pred`` with an int8 engine calibrated on ``image`` itself, as ``segment`` calibrates on a slide; other
    engines unchanged."""
    folder.mkdir(parents=True, exist_ok=True)
    return calibrate_image(pred, image, folder / f"image{CALIBRATION_SUFFIX}")


def accuracy(pred: DensePredictor, limit: int, dataset: str = "monuseg-test", slide: bool = False) -> dict[str, float]:
    """Mean PQ/AJI on ``dataset``; ``slide``: each image's int8 graph calibrated on that image (a fresh cache each,
    so no image reuses another's graph)."""
    card = pred.card()
    params = WatershedParams(**card.postprocess)

    def predict(s: Sample) -> np.ndarray:
        h, w = s.image.shape[:2]
        f = s.mpp / card.mpp
        img = cv2.resize(s.image[..., :3], (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA)
        if slide:
            with tempfile.TemporaryDirectory() as tmp:
                np_prob, hv, _ = calibrated_on(pred, img, Path(tmp)).predict(img)
        else:
            np_prob, hv, _ = pred.predict(img)
        inst = separate_instances(np_prob, hv, card.mpp, params)
        return cv2.resize(inst.astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST).astype(np.int32)

    res = score_dataset(dataset, predict, limit)
    return {"pq": res["mean"]["pq"], "aji": res["mean"]["aji"]}


def prepare(
    name: str, art: ModelArtifact, region: np.ndarray, bf16: bool, calibrate_in: Path | None = None
) -> tuple[DensePredictor, float]:
    """The engine's predictor after one warm-up pass; the seconds that pass took (export/calibrate/compile).
    ``calibrate_in``: calibrate an int8 engine on the region itself, its crops written there."""
    pred: DensePredictor = (
        CompiledPredictor(art) if name == "torch-compile" else NetworkPredictor(art, runtime=name, bf16=bf16)
    )
    t0 = time.perf_counter()
    if calibrate_in is not None:
        pred = calibrated_on(pred, region, calibrate_in)
    pred.predict(region)
    return pred, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--limit", type=int, default=14, help="images scored per engine (0: none)")
    ap.add_argument("--dataset", default="monuseg-test", choices=("monuseg-test", "dsb"), help="scored dataset")
    ap.add_argument(
        "--calibration",
        choices=("monuseg", "slide"),
        default="monuseg",
        help="int8 calibration: MoNuSeg training crops (one graph), or each scored image itself, as segment "
        "calibrates on each slide (the region's speed row is then calibrated on the region)",
    )
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ", ".join(ENGINES))
    ap.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="arithmetic of every engine (bf16 only where the CPU computes it natively; int8 engines ignore it)",
    )
    args = ap.parse_args()
    bf16 = args.precision == "bf16"
    if bf16 and not cpu_native_bf16()[0]:
        raise SystemExit("--precision bf16: this CPU has no native bf16 (it would be emulated, ~100x slower)")
    torch.set_num_threads(1)
    scratch = tempfile.mkdtemp(prefix="histoseg-bench-")  # prep timed from empty caches (export and inductor)
    os.environ.setdefault(CACHE_ENV, scratch)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(scratch, "inductor"))
    print(cpu_line())
    print(f"precision: {args.precision} (torch-compile: fp32); int8 calibrated on: {args.calibration}")
    tissue, mpp0 = cmu1_pixels()
    step = 0.5 / mpp0
    idx = (np.arange(args.size) * step).astype(int)
    region = np.ascontiguousarray(tissue[np.ix_(idx % tissue.shape[0], idx % tissue.shape[1])])
    art = resolve_model("default")
    preds: dict[str, DensePredictor] = {}
    prep: dict[str, float] = {}
    slide = args.calibration == "slide"
    for name in ["torch"] + [e for e in args.engines.split(",") if e != "torch"]:
        if name not in ENGINES:
            raise SystemExit(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")
        if name != "torch-compile" and not available(name):
            print(f"{name:<17} not installed")
            continue
        try:
            preds[name], prep[name] = prepare(name, art, region, bf16, Path(scratch) / "region" if slide else None)
        except Exception as exc:  # report and carry on: torch.compile needs a working C++ toolchain
            print(f"{name:<17} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    times: dict[str, list[float]] = {n: [] for n in preds}
    cpu: dict[str, list[float]] = {n: [] for n in preds}
    maps: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for _ in range(args.reps):  # rounds over all engines: a load change on a shared machine hits each alike
        for name, pred in preds.items():
            t0, c0 = time.perf_counter(), time.process_time()
            np_prob, hv, _ = pred.predict(region)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            maps[name] = (np_prob, hv)
    c_base, base = min(cpu["torch"]), maps["torch"]
    pq_base: float | None = None
    print(
        f"{'engine':<17} {'prep s':>7} {'wall s':>7} {'cpu s':>6} {'MP/s':>6} {'vs eager':>8} {'max|diff|':>9}"
        + (f"  {args.dataset + ' PQ':>15}    AJI    dPQ" if args.limit else "")
    )
    for name, pred in preds.items():
        t, c = min(times[name]), min(cpu[name])
        diff = max(float(np.abs(maps[name][0] - base[0]).max()), float(np.abs(maps[name][1] - base[1]).max()))
        acc_s = ""
        if args.limit:
            acc = accuracy(pred, args.limit, args.dataset, slide)
            pq_base = acc["pq"] if pq_base is None else pq_base
            dpq = acc["pq"] - pq_base
            ok = "ok" if dpq >= -PQ_TOLERANCE else f"drop > {PQ_TOLERANCE}"
            acc_s = f"  {acc['pq']:15.4f} {acc['aji']:6.4f} {dpq:+.4f} {ok}"
        print(
            f"{name:<17} {prep[name]:7.1f} {t:7.3f} {c:6.3f} {args.size**2 / 1e6 / c:6.3f} {c_base / c:7.2f}x "
            f"{diff:9.1e}{acc_s}",
            flush=True,
        )


if __name__ == "__main__":
    main()
