"""Scaling benchmark: ``histoseg segment --workers 1`` vs ``--workers 2`` on one slide and on a batch.

    python benchmarks/scaling.py [--size 6000] [--slides 4] [--workers 1,2] [--workdir /tmp/histoseg-scaling]
                                 [--model default] [--extra '--region-size 1024']

Each run is a fresh ``python -m histoseg.cli.main segment`` subprocess (no warm caches shared between
runs). Reported per run: wall time (process start to exit, so it includes interpreter, model and Dask
start-up), the region phase alone (``timings_s.regions_wall`` of provenance.json, summed over slides),
speed-up of both against the 1-worker run of the same scenario, the peak RSS of each process of the run
(with ``--workers 1`` the CLI process is the worker; with more, Dask worker processes are its children),
and the 1-minute load average before the run and averaged during it: a busy machine makes any speed-up
figure meaningless, so read each figure next to its load. Target (issue): 2 workers >= 1.7x on a quiet
2-core machine. Slides are tiled from real tissue (CMU-1) by ``_common.build_tissue_slide``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

try:  # python -m benchmarks.scaling, or imported from the package
    from benchmarks._common import build_tissue_slide
except ModuleNotFoundError:  # python benchmarks/scaling.py: this folder is sys.path[0]
    from _common import build_tissue_slide


@dataclass
class TreeSampler:
    """Samples the RSS of every process in the tree rooted at ``pid`` (peak per process) and the load."""

    pid: int
    interval: float = 0.2
    peaks: dict[int, int] = field(default_factory=dict)
    roles: dict[int, str] = field(default_factory=dict)
    loads: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    if p.pid not in self.roles:
                        self.roles[p.pid] = _role(p, root)
                except psutil.Error:
                    continue
                self.peaks[p.pid] = max(self.peaks.get(p.pid, 0), rss)
            self.loads.append(os.getloadavg()[0])
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    def summary(self) -> dict[str, Any]:
        """Peak RSS in MB of the CLI process and of each worker-like child (helpers listed apart)."""
        main = [self.peaks[p] for p in self.peaks if self.roles.get(p) == "main"]
        workers = sorted((self.peaks[p] for p in self.peaks if self.roles.get(p) == "worker"), reverse=True)
        helpers = [self.peaks[p] for p in self.peaks if self.roles.get(p) == "helper"]
        mb = 1 << 20
        return {
            "main_peak_mb": round(max(main, default=0) / mb),
            "worker_peak_mb": [round(w / mb) for w in workers],
            "helper_peak_mb": [round(h / mb) for h in helpers],
            "load_during": round(sum(self.loads) / len(self.loads), 2) if self.loads else None,
        }


def _role(p: psutil.Process, root: psutil.Process) -> str:
    if p.pid == root.pid:
        return "main"
    cmd = " ".join(p.cmdline())
    return "helper" if "resource_tracker" in cmd or "semaphore_tracker" in cmd else "worker"


def run_once(slides: list[Path], out: Path, workers: int, model: str, extra: list[str]) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "histoseg.cli.main", "segment", *map(str, slides), "-o", str(out)]
    cmd += ["--workers", str(workers), "--model", model, *extra]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeSampler(proc.pid) as sampler:
        log, _ = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"segment failed with exit code {proc.returncode}:\n{log[-3000:]}")
    regions_wall = nuclei = regions = 0.0
    for s in slides:
        prov = json.loads((out / s.stem / "provenance.json").read_text())
        regions_wall += float(prov["timings_s"]["regions_wall"])
        nuclei += prov["nuclei"]
        regions += prov["processing"]["regions"]
    mem = sampler.summary()
    if workers == 1:  # in-process: the CLI process is the worker
        mem["worker_peak_mb"] = [mem["main_peak_mb"]]
    return {
        "wall_s": round(wall, 2),
        "regions_wall_s": round(regions_wall, 2),
        "regions": int(regions),
        "nuclei": int(nuclei),
        "load_before": round(load_before, 2),
        **mem,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=6000, help="slide side in level-0 px (0.5 µm/px)")
    ap.add_argument("--slides", type=int, default=4, help="slides in the batch scenario")
    ap.add_argument("--workers", default="1,2", help="comma list; the first is the speed-up baseline")
    ap.add_argument("--workdir", default="/tmp/histoseg-scaling")
    ap.add_argument("--model", default="default", help="registered model name or .safetensors path")
    ap.add_argument("--extra", default="", help="extra segment options, e.g. '--precision fp32 --region-size 512'")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = build_tissue_slide(work / f"tissue_{args.size}.tif", args.size)
    batch = []
    for i in range(args.slides):  # distinct names (one output folder each), same real-tissue pixels
        p = work / f"batch_{args.size}_{i}.tif"
        if not p.exists():
            shutil.copyfile(base, p)
        batch.append(p)
    print(f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.1f} GiB; slides "
          f"{args.size}x{args.size} px at 0.5 µm/px from CMU-1 tissue ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    scenarios = {"1 slide": [base], f"{len(batch)} slides": batch}
    rows: list[dict[str, Any]] = []
    for name, slides in scenarios.items():
        ref: dict[str, Any] | None = None
        for w in [int(x) for x in args.workers.split(",")]:
            r = run_once(slides, work / f"out_{len(slides)}_{w}", w, args.model, args.extra.split())
            ref = ref or r
            r["speedup_wall"] = round(ref["wall_s"] / r["wall_s"], 2)
            r["speedup_regions"] = round(ref["regions_wall_s"] / r["regions_wall_s"], 2)
            rows.append({"scenario": name, "workers": w, **r})
            print(f"  {name}, {w} worker(s): wall {r['wall_s']:.1f} s, load before {r['load_before']:.2f}, "
                  f"during {r['load_during']}", flush=True)  # fmt: skip
    print_table(rows)
    print(json.dumps({"size": args.size, "cores": os.cpu_count(), "model": args.model, "runs": rows}, indent=1))


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ("scenario", "workers", "wall s", "x", "regions s", "x", "worker peak MB", "main MB", "load b/d")
    table = [head]
    for r in rows:
        table.append(
            (
                r["scenario"],
                str(r["workers"]),
                f"{r['wall_s']:.1f}",
                f"{r['speedup_wall']:.2f}",
                f"{r['regions_wall_s']:.1f}",
                f"{r['speedup_regions']:.2f}",
                ",".join(str(m) for m in r["worker_peak_mb"]),
                str(r["main_peak_mb"]),
                f"{r['load_before']:.2f}/{r['load_during']}",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))


if __name__ == "__main__":
    main()
