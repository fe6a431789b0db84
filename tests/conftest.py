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


TEST_PROCESS_MEMORY = 4e9
"""Memory one test process may need at once: the heaviest tests run a slide on two Dask workers beside their own
process (~3 GB together), so ``-n auto`` starts no more test processes than the machine has room for."""


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """How many processes ``-n auto`` (``pyproject.toml``'s addopts) runs the suite in: one per usable core, at
    most one per ``TEST_PROCESS_MEMORY`` of physical memory (where the OS tells it). On CI's 2 cores the suite
    took 26-27 min in 2 processes against 40 min in one (a first-generation AMD EPYC): most tests keep one core
    busy at a time."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name: cores decide
        return max(1, cores)
    return max(1, min(cores, int(memory // TEST_PROCESS_MEMORY)))


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
# runs and passes the guard (shift score 14, above the gate; mirror-view agreement 0.55 -> 0.80 on the pipeline's
# crops; benchmarks/tta_dev.py: PQ 0.148 -> 0.378): tests that need adapted weights
DSB_ADAPTS = "e49fc2b4f1f39d481a6525225ab3f688be5c87f56884456ad54c953315efae83"
# one whose adaptation passes the census and stain checks but makes the maps less consistent under mirroring
# (agreement 0.767 -> 0.746 on the pipeline's crops): the guard keeps the source
DSB_VIEW_REJECTS = "2246874c8b5ba218d01ad8153a201ad4660195f3e4c65da6b9d4ccaf82cb7edf"


def dsb_image(shared_data: Path, name: str) -> Path:
    return shared_data / "nuclei" / "dsb2018-he" / "stage1_train" / name / "images" / f"{name}.png"


def dsb_image_that_adapts(shared_data: Path) -> Path:
    return dsb_image(shared_data, DSB_ADAPTS)
