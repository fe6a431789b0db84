"""Throughput benchmark of ``histoseg segment`` on multi-level slides built from real tissue, as ratios.

    python -m benchmarks.throughput [--sizes 10000,20000] [--workers 1,2] [--workdir /tmp/hsbench]

``--workers`` takes counts and ``auto`` (the command line's default: one worker per usable core).

For each slide size and worker count it runs ``segment`` twice, each in its own process (so allocator
settings and peak memory do not leak from one run into the next): the current default, and the previous
default (``--previous``: the options and environment of the earlier defaults; ``HISTOSEG_KEEP_MEMORY=0``
restores the allocator's own behaviour), in the same run on the same machine, so the speed-up is a ratio
and not a comparison of two days' machine loads. Printed per run: tissue megapixels per second at the
processing resolution (tissue cells of the plane: the same area for both settings, whatever their region
size), wall time, CPU time of the whole process tree (user and system), peak RSS summed over all processes,
and the time split (summed over region tasks: read, network, post-processing; then adaptation, stitch,
export); where ``nvidia-smi`` answers, the GPU's mean and highest utilisation and its highest memory in use.
Then the ratio current/previous and the speed-up from 1 worker.

Before the slides, where more than one worker is measured: this machine's own ceiling for that scaling, the
network alone in one process and in N at once (:mod:`benchmarks._ceiling`; ``--no-ceiling`` skips it).

Targets (issue 13): >= 1 MP/s on 2 cores with the default network; peak memory < 3 GB, flat in slide size;
>= 1.7x from 1 to 2 workers. On a machine shared with other jobs, wall time includes waiting for a core:
compare the CPU seconds (and the load average printed with each row) before trusting a wall-time ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

try:  # python -m benchmarks.throughput, or imported from the package
    from benchmarks._ceiling import ceiling, ceiling_line
    from benchmarks._common import GpuSampler, PeakRSS, build_tissue_slide
    from benchmarks.precision import cpu_line
except ModuleNotFoundError:  # python benchmarks/throughput.py: this folder is sys.path[0]
    from _ceiling import ceiling, ceiling_line  # type: ignore[no-redef]
    from _common import GpuSampler, PeakRSS, build_tissue_slide  # type: ignore[no-redef]
    from precision import cpu_line  # type: ignore[no-redef]

PREVIOUS = "--region-size 1024 --runtime torch"
"""The previous default's options (issue 13's starting point). A change of a default that alters speed
(e.g. ``--model``, ``--region-size``) adds the old value here, so the benchmark keeps measuring against it."""
PREVIOUS_ENV = "HISTOSEG_KEEP_MEMORY=0"
SPLIT = ("read", "network", "postprocess", "adapt", "stitch", "export")


def tissue_mp(slide: Path) -> tuple[float, float, float]:
    """Megapixels of the tissue cells of the processing plane (``tiling.TISSUE_CELL`` grid), default settings;
    then the network's input with them (the regions' read boxes: tissue boxes plus halo) and what whole cores
    plus halo would be."""
    from histoseg.config import SegmentConfig
    from histoseg.pipeline.plan import default_predictor, plan_slide
    from histoseg.tiling import TISSUE_CELL, network_input

    config = SegmentConfig()
    plan = plan_slide(slide, config, default_predictor(config))
    read = network_input(plan.regions) / 1e6
    whole = sum((r.core.w + 2 * r.halo) * (r.core.h + 2 * r.halo) for r in plan.regions) / 1e6
    return float(plan.cells.sum()) * TISSUE_CELL**2 / 1e6, read, whole


def run_once(
    slide: Path, out: Path, workers: str, options: list[str], env: dict[str, str], mp: float
) -> dict[str, Any]:
    """One ``histoseg segment`` in a child process; its figures (see the module docstring).

    The child runs in the work folder: ``python -m`` puts its working folder first on ``sys.path``, so run from
    a source tree it would import that tree's ``histoseg`` whatever ``env``'s ``PYTHONPATH`` says, and an A/B of
    two packages would measure one twice. ``package`` names the one it imported."""
    shutil.rmtree(out, ignore_errors=True)
    slide, out = slide.resolve(), out.resolve()
    child_env = {**os.environ, **env}
    package = subprocess.run(
        [sys.executable, "-c", "import histoseg; print(histoseg.__file__)"],
        env=child_env, cwd=out.parent, capture_output=True, text=True, check=True,
    ).stdout.strip()
    cmd = [sys.executable, "-m", "histoseg.cli.main", "segment", str(slide), "-o", str(out)]
    cmd += ["--workers", str(workers), "--no-report", *options]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with PeakRSS(children_only=True) as mem, GpuSampler() as gpu:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=child_env, cwd=out.parent, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    prov = json.loads((out / slide.stem / "provenance.json").read_text())
    p, t = prov["processing"], {k: float(v) for k, v in prov["timings_s"].items()}
    t["adapt"] = float((prov.get("adaptation") or {}).get("seconds_total", 0.0) or 0.0)
    return {
        "package": str(Path(package).parent),
        "wall_s": wall,
        "mp_per_s": mp / wall,
        "cpu_user_s": after.ru_utime - before.ru_utime,
        "cpu_sys_s": after.ru_stime - before.ru_stime,
        "regions": p["regions"],
        "region_size": p["region_size"],
        "nuclei": prov["nuclei"],
        "peak_rss_gb": mem.peak / 1e9,
        "load": os.getloadavg()[0],
        **gpu.figures,
        **{f"t_{k}": v for k, v in t.items()},
    }


def _row(label: str, r: dict[str, Any]) -> str:
    split = {k: r.get(f"t_{k}", 0.0) for k in SPLIT}
    busy = sum(split.values()) or 1.0
    gpu = (
        f"           GPU: utilisation {r['gpu_util_mean']:.1f}% on average, at most {r['gpu_util_max']:.0f}%; "
        f"memory in use at most {r['gpu_mem_peak_gb']:.1f} GB\n"
        if "gpu_util_mean" in r
        else ""
    )
    return (
        f"  {label:<8} {r['mp_per_s']:.3f} MP/s, wall {r['wall_s']:.1f} s, CPU {r['cpu_user_s']:.1f} user + "
        f"{r['cpu_sys_s']:.1f} sys s, peak RSS {r['peak_rss_gb']:.2f} GB, {r['regions']} regions of "
        f"{r['region_size']}, {r['nuclei']} nuclei, load {r['load']:.1f}\n"
        f"           package: {r['package']}\n"
        + gpu
        + "           split: "
        + ", ".join(f"{k} {v:.1f} s ({100 * v / busy:.0f}%)" for k, v in split.items())
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,20000")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--workdir", default="/tmp/histoseg-bench")
    ap.add_argument("--extra", default="", help="options for both runs, e.g. '--precision fp32'")
    ap.add_argument("--previous", default=PREVIOUS, help="options of the previous default")
    ap.add_argument("--previous-env", default=PREVIOUS_ENV, help="environment (K=V ...) of the previous default")
    ap.add_argument("--no-previous", action="store_true", help="measure the current default only")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the scaling ceiling (benchmarks._ceiling)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    extra = shlex.split(args.extra)
    configs: list[tuple[str, list[str], dict[str, str]]] = [("current", extra, {})]
    if not args.no_previous:
        env = dict(kv.split("=", 1) for kv in shlex.split(args.previous_env))
        configs.append(("previous", [*shlex.split(args.previous), *extra], env))
    print(cpu_line())
    print(f"load average before: {os.getloadavg()}; previous default: {args.previous} [{args.previous_env}]")
    counts = [len(os.sched_getaffinity(0)) if w.strip() == "auto" else int(w) for w in args.workers.split(",")]
    limit = None
    if max(counts) > 1 and not args.no_ceiling and "cuda" not in args.extra:
        limit = ceiling(max(counts))  # what the pipeline's speed-up from 1 worker is to be read against
        print(ceiling_line(limit))
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        t0 = time.perf_counter()
        slide = build_tissue_slide(work / f"tissue_{size}.tif", size)
        mp, read, whole = tissue_mp(slide)
        print(
            f"slide {slide.name}: {size}x{size} px at 0.5 µm/px from real CMU-1 tissue, {mp:.1f} MP of tissue "
            f"({time.perf_counter() - t0:.0f} s); network input with the default region size: {read:.1f} MP "
            f"({read / mp:.2f}x the tissue; whole cores plus halo would be {whole:.1f} MP, {whole / mp:.2f}x)"
        )
        one: dict[str, dict[str, Any]] = {}
        for w in [x.strip() for x in args.workers.split(",")]:
            got = {}
            for name, options, env in configs:
                got[name] = run_once(slide, work / f"out_{size}_{w}_{name}", w, options, env, mp)
                one.setdefault(name, got[name])
                got[name]["speedup_vs_1_worker"] = one[name]["wall_s"] / got[name]["wall_s"]
                rows.append({"size": size, "workers": w, "config": name, **got[name]})
            print(f"size {size} workers {w}:")
            for name, r in got.items():
                print(_row(name, r) + f"\n           speed-up from 1 worker: {r['speedup_vs_1_worker']:.2f}x")
            if "previous" in got:
                cur, prev = got["current"], got["previous"]
                cpu_ratio = (prev["cpu_user_s"] + prev["cpu_sys_s"]) / max(cur["cpu_user_s"] + cur["cpu_sys_s"], 1e-9)
                same = "same" if cur["nuclei"] == prev["nuclei"] else "DIFFERENT"
                print(
                    f"  current / previous: {cur['mp_per_s'] / prev['mp_per_s']:.2f}x MP/s (wall), "
                    f"{cpu_ratio:.2f}x less CPU time, peak RSS {cur['peak_rss_gb'] / prev['peak_rss_gb']:.2f}x; "
                    f"nuclei {same}"
                )
    if limit is not None:
        rows.append({"ceiling": limit})
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
