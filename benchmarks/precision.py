"""Network arithmetic by CPU: fp32 vs bf16 on the machine it runs on, and what ``--precision auto`` picks.

Prints the CPU (model, the bf16-relevant flags, PyTorch's CPU capability), the choice of ``auto`` and its
reason, then times one 3x3 convolution (32 channels, 256²) and the shipped network on a real-tissue region
(CMU-1-Small-Region, 512² at 0.5 µm/px) in fp32 and under bf16 autocast, one thread, in the same run, with
the ratio. Run it as ``ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/precision.py`` on an AVX-512 machine to see
what an AVX2-only CPU (most laptops, AMD servers before Zen 4) gets from bf16: the slowdown that made
``auto`` the default.

    python benchmarks/precision.py [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from histoseg.inference.eager import run_network
from histoseg.inference.precision import _cpuinfo_flags, resolve_precision
from histoseg.models import load_model, resolve_model


def cpu_line() -> str:
    """The CPU the figures were measured on: model, family/model numbers and clock (a virtual machine may name
    every generation "AMD EPYC": family 23 model 1 is Zen 1, whose 128-bit vector units run the same AVX2 code
    about half as fast as Zen 2/3's), cores, vector flags and PyTorch's kernels."""
    model = platform.processor() or platform.machine()
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if not key and info:
                    break  # the first processor's block is enough
                info.setdefault(key, value.strip())
    except OSError:
        pass
    model = info.get("model name", model)
    ident = ", ".join(
        f"{label} {info[key]}" for key, label in (("cpu family", "family"), ("model", "model"), ("cpu mhz", "MHz"))
        if key in info
    )
    flags = sorted(f for f in _cpuinfo_flags() if f.startswith(("avx", "amx", "bf16", "sve")))
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    return (
        f"CPU: {model} ({platform.machine()}{'; ' + ident if ident else ''}), {os.cpu_count()} cores; "
        f"flags: {' '.join(flags) or '-'}; torch capability {torch.backends.cpu.get_cpu_capability()}"
        + (f"; ONEDNN_MAX_CPU_ISA={isa}" if isa else "")
    )


def best_of(fn: object, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", type=int, default=512, help="network input side (processing px)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(cpu_line())
    choice = resolve_precision("auto")
    print(f"--precision auto -> {choice.precision} ({choice.reason})")

    conv = torch.nn.Conv2d(32, 32, 3, padding=1).eval()
    x = torch.randn(1, 32, 256, 256)

    def conv_run(bf16: bool) -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            conv(x)

    try:  # python -m benchmarks.precision, or imported from the package
        from benchmarks._common import cmu1_pixels
    except ModuleNotFoundError:  # python benchmarks/precision.py: this folder is sys.path[0]
        from _common import cmu1_pixels  # type: ignore[no-redef]

    tissue, mpp0 = cmu1_pixels()
    art = resolve_model("default")
    net, card = load_model(art)
    step = card.mpp / mpp0
    rows = (np.arange(args.size) * step).astype(int) + 800
    cols = (np.arange(args.size) * step).astype(int) + 600
    region = np.ascontiguousarray(tissue[np.ix_(rows, cols)])  # nearest sampling to the card's mpp

    results = {}
    for name, fn in (("conv 3x3 32ch 256²", conv_run), ("network", None)):
        for bf16 in (False, True):
            if fn is None:
                run_network(net, card, region, bf16=bf16)  # warm-up
                t = best_of(lambda b=bf16: run_network(net, card, region, bf16=b), args.reps)
            else:
                fn(bf16)
                t = best_of(lambda b=bf16, f=fn: f(b), args.reps)
            results[(name, bf16)] = t
        f32, b16 = results[(name, False)], results[(name, True)]
        mp = args.size**2 / 1e6
        extra = f"  ({mp / f32:.3f} / {mp / b16:.3f} MP/s)" if fn is None else ""
        print(f"{name:<20} fp32 {f32:8.3f} s   bf16 {b16:8.3f} s   bf16/fp32 {b16 / f32:6.2f}x{extra}")
    faster = "bf16" if results[("network", True)] < results[("network", False)] else "fp32"
    print(f"faster here: {faster}; auto chose {choice.precision}" + ("" if faster == choice.precision else "  (!)"))


if __name__ == "__main__":
    main()
