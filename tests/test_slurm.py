"""``histoseg segment --cluster slurm`` on a real one-machine SLURM cluster (tests/slurm_fixture.sh).

Needs Debian's slurm-wlm and munge and root (.ci/run installs them). In CI a missing install fails the
test; elsewhere it is skipped with the reason. The daemons are stopped at the end of the session, also
when a test fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from histoseg.cli.main import main

from .test_cluster import model_arguments, write_cmu1_crops

FIXTURE_SCRIPT = Path(__file__).resolve().parent / "slurm_fixture.sh"
ARRAY_SCRIPT = Path(__file__).resolve().parent.parent / "workflows" / "sbatch" / "segment-array.sbatch"
NEEDED = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "scontrol")
SYSTEM_BIN = "/usr/sbin:/sbin"  # the daemons live here; a non-login PATH may lack it


def _unavailable(reason: str) -> None:
    msg = f"SLURM fixture unavailable: {reason}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="session")
def slurm() -> Iterator[Path]:
    """A running single-node SLURM cluster (partition ``debug``); yields its slurm.conf.

    Its folder is a fresh one in the system temp dir, not pytest's: munged refuses a socket below a
    folder that others cannot traverse, and pytest's temp folders are private (0700).
    """
    search = f"{os.environ.get('PATH', '')}:{SYSTEM_BIN}"
    missing = [cmd for cmd in NEEDED if shutil.which(cmd, path=search) is None]
    if missing:
        _unavailable(f"{', '.join(missing)} not found (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        _unavailable("slurmd must run as root")
    root = Path(tempfile.mkdtemp(prefix="histoseg-slurm-"))
    root.chmod(0o755)
    ctld, slurmd = _free_ports(2)
    env = {
        **os.environ,
        "PATH": search,
        "SLURM_FIXTURE_DIR": str(root),
        "SLURM_FIXTURE_CTLD_PORT": str(ctld),
        "SLURM_FIXTURE_SLURMD_PORT": str(slurmd),
    }
    conf = root / "etc" / "slurm.conf"
    old_conf = os.environ.get("SLURM_CONF")
    try:
        done = subprocess.run(
            ["bash", str(FIXTURE_SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            pytest.fail(f"SLURM fixture failed to start:\n{done.stdout}\n{done.stderr}")
        os.environ["SLURM_CONF"] = str(conf)
        yield conf
    finally:
        subprocess.run(["bash", str(FIXTURE_SCRIPT), "stop"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf


@dataclass(frozen=True)
class Reference:
    """Two small real slides, model flags, and their outputs from a plain local run."""

    slides_dir: Path
    slides: list[Path]
    model: list[str]
    out: Path


@pytest.fixture(scope="module")
def reference(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    root = tmp_path_factory.mktemp("slurm-reference")
    slides = write_cmu1_crops(shared_data, root / "slides")
    model = model_arguments(root, slides[0])
    assert main(["segment", str(root / "slides"), "-o", str(root / "local"), *model]) == 0
    for slide in slides:
        assert len(pq.read_table(root / "local" / slide.stem / f"{slide.stem}.nuclei.parquet")) > 10, slide
    return Reference(root / "slides", slides, model, root / "local")


def _assert_same_outputs(a: Path, b: Path, stem: str) -> None:
    assert pq.read_table(a / stem / f"{stem}.nuclei.parquet").equals(pq.read_table(b / stem / f"{stem}.nuclei.parquet"))
    for name in ("labels/nuclei/0", "labels/classes/0"):
        za = zarr.open_group(str(a / stem / f"{stem}.zarr"), mode="r")[name][:]
        zb = zarr.open_group(str(b / stem / f"{stem}.zarr"), mode="r")[name][:]
        np.testing.assert_array_equal(za, zb)
    assert (a / stem / f"{stem}.geojson").read_bytes() == (b / stem / f"{stem}.geojson").read_bytes()


def test_segment_on_slurm_matches_local_run(
    slurm: Path,
    reference: Reference,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    out = tmp_path / "slurm"
    cluster = ["--cluster", "slurm", "--jobs", "1", "--queue", "debug", "--cores", "1", "--memory", "2GB"]
    cluster += ["--interface", "lo", "--walltime", "00:10:00", "--worker-timeout", "120"]
    with caplog.at_level("INFO", logger="histoseg"):
        assert main(["segment", str(reference.slides_dir), "-o", str(out), *reference.model, *cluster]) == 0
    assert "dask dashboard: http" in caplog.text
    for slide in reference.slides:
        _assert_same_outputs(reference.out, out, slide.stem)
    # the regions really ran in a SLURM job: its worker wrote its log where the batch puts them
    logs = list((out / "_cluster_logs").glob("*.err"))
    assert logs and any("Starting Worker" in p.read_text() for p in logs)
    assert [p.name for p in tmp_path.iterdir()] == ["slurm"]


def test_sbatch_array_script_segments_one_slide_per_task(slurm: Path, reference: Reference, tmp_path: Path) -> None:
    listing = tmp_path / "slides.txt"
    listing.write_text("".join(f"{p}\n" for p in reference.slides))
    out = tmp_path / "array"
    env = {
        **os.environ,
        "HISTOSEG": f"{sys.executable} -m histoseg.cli.main",
        "HISTOSEG_ARGS": " ".join(reference.model),
    }
    cmd = ["sbatch", "--wait", f"--array=1-{len(reference.slides)}", "--cpus-per-task=1", "--mem=2G"]
    cmd += [f"--output={tmp_path}/task-%a.log", str(ARRAY_SCRIPT), str(listing), str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("task-*.log")))
    assert done.returncode == 0, f"{done.stdout}{done.stderr}\n{logs}"
    for slide in reference.slides:
        _assert_same_outputs(reference.out, out, slide.stem)
