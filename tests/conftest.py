"""Shared test fixtures.

Tests that need ``../shared/data`` use the ``shared_data`` fixture: in CI (``CI=true``) a missing folder is
a failure, elsewhere the test is skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from histoseg.config import data_dir
from histoseg.inference.precision import CPU_BF16_ENV, cpu_native_bf16


def pytest_configure(config: pytest.Config) -> None:
    """Run the whole suite (and the CLI subprocesses it starts) as on a CPU without native bf16.

    ``--precision auto`` then resolves to fp32 on every machine, so the suite's time and its numbers do not
    depend on the CPU it runs on (bf16 is ~100x slower where it is emulated). ``HISTOSEG_CPU_BF16=1`` in the
    environment runs it with native bf16 instead. ``tests/test_precision.py`` checks the choice itself.
    """
    os.environ.setdefault(CPU_BF16_ENV, "0")
    cpu_native_bf16.cache_clear()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = data_dir()
    if not d.is_dir():
        msg = f"shared data folder not found at {d} (set HISTOSEG_DATA)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return d


def make_demo_slide(out: Path, size: int, seed: int) -> Path:
    """Write the embedded demo slide (``sample_data/make_sample.py``) of ``size`` px to ``out``."""
    script = Path(__file__).resolve().parent.parent / "sample_data" / "make_sample.py"
    cmd = [sys.executable, str(script), str(out), "--size", str(size), "--seed", str(seed)]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


# a DSB 2018 H&E image (another lab; 320 x 256 px, read at 0.5 µm/px) on which the default per-slide adaptation
# runs and passes the guard (benchmarks/tta_dev.py: +0.11 PQ over no adaptation): tests that need adapted weights
DSB_ADAPTS = "2246874c8b5ba218d01ad8153a201ad4660195f3e4c65da6b9d4ccaf82cb7edf"


def dsb_image_that_adapts(shared_data: Path) -> Path:
    return shared_data / "nuclei" / "dsb2018-he" / "stage1_train" / DSB_ADAPTS / "images" / f"{DSB_ADAPTS}.png"
