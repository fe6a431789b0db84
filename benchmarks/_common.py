"""Shared helpers of the benchmark scripts: real-tissue test slides, whole-process memory and GPU sampling."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from histoseg.config import data_dir
from histoseg.io import open_slide, write_pyramidal_tiff
from histoseg.types import Box


def cmu1_pixels() -> tuple[np.ndarray, float]:
    """Level-0 RGB of the real CMU-1-Small-Region slide (0.499 µm/px) and its mpp."""
    path = data_dir() / "slides" / "aperio-cmu1-small" / "CMU-1-Small-Region.svs"
    with open_slide(path) as r:
        w, h = r.meta.dimensions
        return r.read_level(0, Box(0, 0, w, h)), float(r.meta.mpp or 0.499)


def cmu1_region(size: int) -> np.ndarray:
    """The centre ``size``² of CMU-1-Small-Region's level 0 (real tissue), contiguous: the network benchmarks'
    one input region."""
    pixels, _ = cmu1_pixels()
    y0, x0 = max(0, (pixels.shape[0] - size) // 2), max(0, (pixels.shape[1] - size) // 2)
    return np.ascontiguousarray(pixels[y0 : y0 + size, x0 : x0 + size])


def build_tissue_slide(path: Path, size: int) -> Path:
    """A ``size`` x ``size`` multi-level slide tiled from real tissue (CMU-1, mirrored copies), 0.5 µm/px.

    Built with the project's own pyramid writer, strip by strip, so memory stays small.
    """
    if path.exists():
        return path
    tissue, _ = cmu1_pixels()
    th, tw = tissue.shape[:2]
    flips = [tissue, tissue[:, ::-1], tissue[::-1], tissue[::-1, ::-1]]

    def source(b: Box) -> np.ndarray:
        out = np.empty((b.h, b.w, 3), np.uint8)
        for y in range(b.y, b.y1):
            ty, ry = divmod(y, th)
            row_out = out[y - b.y]
            x = b.x
            while x < b.x1:
                tx, rx = divmod(x, tw)
                src = flips[(ty % 2) * 2 + (tx % 2)]
                n = min(tw - rx, b.x1 - x)
                row_out[x - b.x : x - b.x + n] = src[ry, rx : rx + n]
                x += n
        return out

    write_pyramidal_tiff(path, source, (size, size), 0.5, quality=90, magnification=20.0)
    return path


class PeakRSS:
    """Samples the summed RSS of this process and all its children every ``interval`` seconds.

    ``children_only``: leave this process out (a benchmark that runs each measurement in a child process)."""

    def __init__(self, interval: float = 0.2, children_only: bool = False) -> None:
        self.interval = interval
        self.children_only = children_only
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            procs = me.children(recursive=True) if self.children_only else [me, *me.children(recursive=True)]
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


GPU_QUERY = ["--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]


def gpu_figures(lines: list[str]) -> dict[str, float]:
    """Mean and highest utilisation (%) and the highest memory in use (GB) of ``nvidia-smi`` samples, one
    ``"util, MiB"`` line per GPU and sample (:data:`GPU_QUERY`); empty without a sample."""
    util, mem = [], []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            util.append(float(parts[0]))
            mem.append(float(parts[1]) * 2**20 / 1e9)
    if not util:
        return {}
    return {"gpu_util_mean": sum(util) / len(util), "gpu_util_max": max(util), "gpu_mem_peak_gb": max(mem)}


class GpuSampler:
    """Samples every GPU's utilisation and memory in use with ``nvidia-smi`` every ``interval_ms`` while the block
    runs; :attr:`figures` holds :func:`gpu_figures` of the samples afterwards (empty where there is no
    ``nvidia-smi``: a machine without an NVIDIA GPU)."""

    def __init__(self, interval_ms: int = 500) -> None:
        self.interval_ms = interval_ms
        self.figures: dict[str, float] = {}
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> GpuSampler:
        exe = shutil.which("nvidia-smi")
        if exe is not None:
            cmd = [exe, *GPU_QUERY, f"--loop-ms={self.interval_ms}"]
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        out, _ = self._proc.communicate(timeout=10)
        self.figures = gpu_figures(out.splitlines())
