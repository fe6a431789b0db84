"""End to end with the shipped model: outputs agree with each other, reruns skip, workers don't matter,
a killed run is not trusted and a rerun completes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from histoseg.cli.main import main

from .conftest import make_demo_slide


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_slide(tmp_path_factory.mktemp("sample") / "demo.tif", 1536, 2)


def _geojson_ids(path: Path) -> list[int]:
    data = json.loads(path.read_text())
    return [int(f["properties"]["measurements"]["Nucleus ID"]) for f in data["features"]]


def _zarr_ids(path: Path) -> set[int]:
    arr = zarr.open_group(str(path), mode="r")["labels/nuclei/0"]
    return set(np.unique(arr[:]).tolist()) - {0}


def test_segment_outputs_agree_and_rerun_skips(sample: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["segment", str(sample), "-o", str(out), "--region-size", "512"]) == 0
    d = out / "demo"
    for name in ("demo.geojson", "demo.zarr", "demo.nuclei.parquet", "provenance.json", "_SUCCESS", "tissue_mask.png"):
        assert (d / name).exists(), name
    table = pq.read_table(d / "demo.nuclei.parquet")
    ids = table.column("id").to_pylist()
    assert len(ids) > 200  # the trained network finds the synthetic nuclei
    assert set(ids) == set(_geojson_ids(d / "demo.geojson")) == _zarr_ids(d / "demo.zarr")
    prov = json.loads((d / "provenance.json").read_text())
    assert prov["nuclei"] == len(ids) and len(prov["model"]["sha256"]) == 64
    # detection quality against the generator's ground truth (level-0 centroids, 0.25 µm/px)
    gt = np.load(sample.with_suffix(".npz"))["centroids"]
    pred = np.stack([table.column("centroid_x").to_numpy(), table.column("centroid_y").to_numpy()], axis=1)
    from histoseg.metrics import detection_counts

    tp, fp, fn = detection_counts(gt, pred, radius=3.0 / 0.25)
    assert 2 * tp / (2 * tp + fp + fn) > 0.6
    stamp = (d / "_SUCCESS").stat().st_mtime_ns
    assert main(["segment", str(sample), "-o", str(out)]) == 0
    assert (d / "_SUCCESS").stat().st_mtime_ns == stamp  # skipped
    assert main(["segment", str(sample), "-o", str(out), "--overwrite", "--region-size", "512"]) == 0
    assert (d / "_SUCCESS").stat().st_mtime_ns != stamp
    assert pq.read_table(d / "demo.nuclei.parquet").column("id").to_pylist() == ids


def test_one_and_two_workers_give_identical_outputs(sample: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "w1", tmp_path / "w2"
    assert main(["segment", str(sample), "-o", str(a), "--region-size", "256", "--workers", "1"]) == 0
    assert main(["segment", str(sample), "-o", str(b), "--region-size", "256", "--workers", "2"]) == 0
    ta = pq.read_table(a / "demo" / "demo.nuclei.parquet")
    tb = pq.read_table(b / "demo" / "demo.nuclei.parquet")
    assert ta.equals(tb)
    za = zarr.open_group(str(a / "demo" / "demo.zarr"), mode="r")["labels/nuclei/0"][:]
    zb = zarr.open_group(str(b / "demo" / "demo.zarr"), mode="r")["labels/nuclei/0"][:]
    np.testing.assert_array_equal(za, zb)
    assert (a / "demo" / "demo.geojson").read_bytes() == (b / "demo" / "demo.geojson").read_bytes()


def test_killed_run_is_not_trusted_and_rerun_completes(sample: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "histoseg.cli.main", "segment", str(sample), "-o", str(out), "--region-size", "256"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    deadline = time.time() + 120
    while not (out / "demo" / "tissue_mask.png").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "demo" / "_SUCCESS").exists()
    assert main(["segment", str(sample), "-o", str(out), "--region-size", "256"]) == 0
    ref = tmp_path / "ref"
    assert main(["segment", str(sample), "-o", str(ref), "--region-size", "256"]) == 0
    resumed = pq.read_table(out / "demo" / "demo.nuclei.parquet")
    assert resumed.equals(pq.read_table(ref / "demo" / "demo.nuclei.parquet"))
    leftovers = [p.name for p in (out / "demo").iterdir() if p.name.startswith(".")]
    assert leftovers == []
