"""Throughput benchmark of ``histoseg segment`` on multi-level slides built from real tissue.

    python benchmarks/throughput.py [--sizes 10000,20000] [--workers 1,2] [--workdir /tmp/hsbench]

For each slide size and worker count: processing-resolution megapixels per second (region cores that hold
tissue, i.e. the area actually segmented), regions per second, peak RSS of all processes, and where the
time goes (summed over region tasks: read, network, post-processing; then stitch and export). The
1-worker run of each size is the baseline the other rows are compared with, measured in the same run.
Targets (issue): >= 1 MP/s on 2 cores with the default network; peak memory < 3 GB, flat in slide size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

try:  # python -m benchmarks.throughput, or imported from the package
    from benchmarks._common import PeakRSS, build_tissue_slide
except ModuleNotFoundError:  # python benchmarks/throughput.py: this folder is sys.path[0]
    from _common import PeakRSS, build_tissue_slide

from histoseg.cli.main import main as cli


def run_once(slide: Path, out: Path, workers: int, extra: list[str]) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        rc = cli(["segment", str(slide), "-o", str(out), "--workers", str(workers), *extra])
        wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"segment failed with exit code {rc}")
    prov = json.loads((out / slide.stem / "provenance.json").read_text())
    p = prov["processing"]
    core_mp = p["regions"] * p["region_size"] ** 2 / 1e6
    t = prov["timings_s"]
    return {
        "wall_s": wall,
        "mp_per_s": core_mp / wall,
        "regions_per_s": p["regions"] / wall,
        "regions": p["regions"],
        "nuclei": prov["nuclei"],
        "peak_rss_gb": mem.peak / 1e9,
        **{f"t_{k}": float(v) for k, v in t.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,20000")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--workdir", default="/tmp/histoseg-bench")
    ap.add_argument("--extra", default="", help="extra segment options, e.g. '--precision fp32'")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    extra = args.extra.split()
    print(f"machine: {os.cpu_count()} cores; load average before: {os.getloadavg()}")
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        t0 = time.perf_counter()
        slide = build_tissue_slide(work / f"tissue_{size}.tif", size)
        took = time.perf_counter() - t0
        print(f"slide {slide.name}: {size}x{size} px at 0.5 µm/px from real CMU-1 tissue ({took:.0f} s)")
        base = None
        for w in [int(x) for x in args.workers.split(",")]:
            r = run_once(slide, work / f"out_{size}_{w}", w, extra)
            base = base or r
            r["speedup_vs_1"] = base["wall_s"] / r["wall_s"]
            rows.append((size, w, r))
            print(
                f"size {size:>6} workers {w}: {r['mp_per_s']:.2f} MP/s, {r['regions_per_s']:.3f} regions/s, "
                f"{r['regions']} regions, {r['nuclei']} nuclei, wall {r['wall_s']:.1f} s, "
                f"peak RSS {r['peak_rss_gb']:.2f} GB, speed-up {r['speedup_vs_1']:.2f}x; load {os.getloadavg()[0]:.2f}"
            )
            busy = {
                k[2:]: v
                for k, v in r.items()
                if k.startswith("t_") and k[2:] in ("read", "network", "postprocess", "stitch", "export")
            }
            total = sum(busy.values()) or 1.0
            print("   time split: " + ", ".join(f"{k} {v:.1f} s ({100 * v / total:.0f}%)" for k, v in busy.items()))
    print(json.dumps([{"size": s, "workers": w, **r} for s, w, r in rows], indent=1))


if __name__ == "__main__":
    main()
