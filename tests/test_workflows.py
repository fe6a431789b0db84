"""workflows/Snakefile run by Snakemake's local executor on two small real slides: one job per slide,
outputs complete, and a second run finds nothing to do."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from .test_cluster import model_arguments, write_cmu1_crops

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"


@pytest.fixture(scope="module")
def snakemake() -> list[str]:
    if importlib.util.find_spec("snakemake") is None:
        msg = "snakemake is not installed (pip install -e '.[test]' on Python >= 3.11)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return [sys.executable, "-m", "snakemake", "-s", str(WORKFLOWS / "Snakefile")]


def test_snakemake_workflow_segments_each_slide_once(snakemake: list[str], shared_data: Path, tmp_path: Path) -> None:
    slides = write_cmu1_crops(shared_data, tmp_path / "slides")
    model = model_arguments(tmp_path, slides[0])
    out = tmp_path / "out"
    settings = {
        "slides": str(tmp_path / "slides"),
        "output": str(out),
        "model": model[1],
        "region_size": model[3],
        "threads": 1,
        "histoseg": f"{sys.executable} -m histoseg.cli.main",
    }
    cmd = [*snakemake, "--cores", "2", "--directory", str(tmp_path / "work"), "--config"]
    cmd += [f"{k}={v}" for k, v in settings.items()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("rule segment:") == 2
    for slide in slides:
        stem = slide.stem
        assert (out / stem / "_SUCCESS").exists(), (out / "_logs" / f"{stem}.log").read_text()
        prov = json.loads((out / stem / "provenance.json").read_text())
        assert prov["nuclei"] == len(pq.read_table(out / stem / f"{stem}.nuclei.parquet")) > 10
        assert "nuclei" in (out / "_logs" / f"{stem}.log").read_text()  # the job's own log
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
