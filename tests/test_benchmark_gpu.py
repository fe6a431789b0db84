"""The throughput benchmark's GPU figures (``benchmarks._common``): ``nvidia-smi`` samples reduced to the mean and
highest utilisation and the highest memory in use; nothing on a machine without an NVIDIA GPU."""

from __future__ import annotations

import shutil

import pytest

from benchmarks._common import GpuSampler, gpu_figures


def test_samples_give_mean_and_highest_utilisation_and_peak_memory() -> None:
    lines = ["0, 0", "12, 1024", "43, 28391", "[N/A], [N/A]", "", "5, 2048"]  # csv,noheader,nounits; MiB
    got = gpu_figures(lines)
    assert got["gpu_util_mean"] == pytest.approx((0 + 12 + 43 + 5) / 4)
    assert got["gpu_util_max"] == 43
    assert got["gpu_mem_peak_gb"] == pytest.approx(28391 * 2**20 / 1e9)
    assert gpu_figures([]) == {} and gpu_figures(["[N/A], [N/A]"]) == {}


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_no_gpu_figures_without_nvidia_smi() -> None:
    with GpuSampler(interval_ms=100) as gpu:
        pass
    assert gpu.figures == {}
