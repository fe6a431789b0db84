"""The yardstick for CPU speed: how close the network runs to what this CPU can compute.

Prints, on the machine it runs on and in one run: the CPU; the shipped network's multiply-accumulates per
megapixel, counted from the model by forward hooks on every convolution (not hand-written), split by part
(stem, encoder stages, decoder, heads); the network's achieved GFLOP/s on one thread in fp32 (and bf16 where
``--precision auto`` picks it); the machine's one-thread peak measured with a large fp32 GEMM and a large
3x3 convolution; and the fraction of that peak the network reaches.

    python benchmarks/limit.py [--size 1024] [--reps 3]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from histoseg.inference.eager import run_network
from histoseg.inference.precision import resolve_precision
from histoseg.models import NucleiNet, load_model, resolve_model

try:  # python -m benchmarks.limit, or imported from the package
    from benchmarks.precision import cpu_line
except ModuleNotFoundError:  # python benchmarks/limit.py: this folder is sys.path[0]
    from precision import cpu_line


def count_macs(net: NucleiNet, size: int) -> dict[str, float]:
    """MACs of one forward pass over a ``size``² input, by top-level part (conv and linear layers only)."""
    macs: dict[str, float] = defaultdict(float)
    hooks = []
    for part_name, part in net.named_children():
        for mod in part.modules():
            if isinstance(mod, nn.Conv2d):

                def hook(m: nn.Module, _inp: object, out: torch.Tensor, name: str = part_name) -> None:
                    assert isinstance(m, nn.Conv2d)
                    k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
                    macs[name] += float(out.numel() * k)

                hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        net(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return dict(macs)


def best_time(fn: Callable[[], object], reps: int) -> float:
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="network input side (processing px)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(cpu_line())
    net, card = load_model(resolve_model("default"))
    mp = args.size**2 / 1e6
    parts = count_macs(net, args.size)
    total = sum(parts.values())
    print(f"network '{card.name}' at {card.mpp} µm/px, {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M params")
    print(f"GMAC per megapixel: {total / mp / 1e9:.1f}  ({2 * total / mp / 1e9:.1f} GFLOP/MP)")
    for name, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<10} {v / mp / 1e9:6.2f} GMAC/MP  {100 * v / total:5.1f}%")

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    gemm = 2 * n**3 / best_time(lambda: a @ b, args.reps) / 1e9
    conv = nn.Conv2d(64, 64, 3, padding=1).eval()
    x = torch.randn(1, 64, 256, 256)
    with torch.no_grad():
        conv_t = best_time(lambda: conv(x), args.reps)
    conv_gf = 2 * 64 * 64 * 9 * 256 * 256 / conv_t / 1e9
    peak = max(gemm, conv_gf)
    print(f"machine peak, one thread, fp32: GEMM {n}² {gemm:.1f} GFLOP/s, conv 3x3 64ch 256² {conv_gf:.1f} GFLOP/s")

    image = np.random.default_rng(0).integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)
    choice = resolve_precision("auto")
    modes = [False] + ([True] if choice.bf16 else [])
    for bf16 in modes:
        t = best_time(lambda b=bf16: run_network(net, card, image, bf16=b), args.reps)
        achieved = 2 * total / t / 1e9
        label = "bf16" if bf16 else "fp32"
        print(
            f"network {label}: {t:.3f} s per {args.size}² = {mp / t:.3f} MP/s, {achieved:.1f} GFLOP/s"
            + ("" if bf16 else f" = {100 * achieved / peak:.0f}% of the fp32 peak")
        )
    print(f"(--precision auto here: {choice.precision}, {choice.reason})")


if __name__ == "__main__":
    main()
