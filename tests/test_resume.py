"""Regions are resumable: a killed run's finished regions are reused, never those of other settings, and
the resumed outputs are byte-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from histoseg.cli.main import build_parser, main
from histoseg.cli.segment import config_from_args
from histoseg.config import SegmentConfig
from histoseg.distributed import InProcessRunner
from histoseg.inference import NetworkPredictor
from histoseg.inference.eager import run_network
from histoseg.models import ModelCard, NetConfig, NucleiNet, registered_models, resolve_model, save_model
from histoseg.pipeline import segment_slide
from histoseg.pipeline.plan import default_predictor
from histoseg.pipeline.resume import STORE_DIR, RegionStore
from histoseg.types import COLUMNS, Box, InstanceTable, PlaneInfo, Region

from .synthetic import random_nuclei, render, write_slide

MPP = 0.5
STEM = "synth"
CALLS: list[str] = []


@dataclass(frozen=True)
class CountingPredictor(NetworkPredictor):
    """The network predictor (same identity: artifact, device, bf16) that records which regions ran."""

    def predict(
        self, image: np.ndarray, region: Region | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        CALLS.append(region.key if region is not None else "?")
        return super().predict(image, region)


def _counting(case: Case, cfg: SegmentConfig) -> CountingPredictor:
    """The default predictor of ``cfg`` (same identity as the pipeline's: weights, device, precision and
    engine), counting regions."""
    base = default_predictor(cfg)
    assert base.artifact == resolve_model(case.model)
    return CountingPredictor(base.artifact, device=base.device, bf16=base.bf16, runtime=base.runtime)


@dataclass(frozen=True)
class Case:
    slide: Path
    model: str  # registered name or .safetensors path
    region_size: int

    def argv(self, out: Path, *extra: str) -> list[str]:
        size = str(self.region_size)
        return ["segment", str(self.slide), "-o", str(out), "--model", self.model, "--region-size", size, *extra]

    def config(self, **changes: object) -> SegmentConfig:
        cfg = config_from_args(build_parser().parse_args(self.argv(Path("-"))))  # exactly what the CLI runs
        return SegmentConfig(**{**cfg.to_dict(), "formats": cfg.formats, **changes})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    """The shipped ``default`` model when registered (bigger halo: fewer, larger regions); otherwise a small
    random network whose NP threshold is set so that it finds a few hundred blobs."""
    d = tmp_path_factory.mktemp("resume")
    if "default" in registered_models():
        labels = random_nuclei((384, 384), 330, seed=5)
        return Case(write_slide(d / f"{STEM}.tif", labels, MPP), "default", 128)
    labels = random_nuclei((512, 512), 580, seed=5)
    slide = write_slide(d / f"{STEM}.tif", labels, MPP)
    torch.manual_seed(0)
    cfg = NetConfig(width=8)
    net = NucleiNet(cfg).eval()
    card = ModelCard(name="tiny-random", net=cfg, mpp=MPP, context_radius_px=8, max_nucleus_um=8.0)
    np_prob = run_network(net, card, render(labels))[0]
    card.postprocess = {"np_threshold": float(np.quantile(np_prob[:, : int(512 * 0.8)], 0.75))}
    art = save_model(net, card, d / "tiny.safetensors")
    return Case(slide, str(art.weights), 64)


def _provenance(out: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((out / STEM / "provenance.json").read_text())


def _assert_same_outputs(a: Path, b: Path) -> None:
    ta = pq.read_table(a / STEM / f"{STEM}.nuclei.parquet")
    assert ta.equals(pq.read_table(b / STEM / f"{STEM}.nuclei.parquet"))
    for name in ("labels/nuclei/0", "labels/classes/0"):
        za = zarr.open_group(str(a / STEM / f"{STEM}.zarr"), mode="r")[name][:]
        zb = zarr.open_group(str(b / STEM / f"{STEM}.zarr"), mode="r")[name][:]
        np.testing.assert_array_equal(za, zb)
    geo = f"{STEM}.geojson"
    assert (a / STEM / geo).read_bytes() == (b / STEM / geo).read_bytes()


def _stored(out: Path) -> int:
    return len(list((out / STEM / STORE_DIR).glob("*.npz")))


def test_killed_run_resumes_only_missing_regions(case: Case, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    assert main(case.argv(ref)) == 0
    prov = _provenance(ref)
    total = prov["processing"]["regions"]
    assert total >= 9 and prov["nuclei"] > 20
    assert prov["processing"]["regions_reused"] == 0 and prov["processing"]["regions_computed"] == total
    assert not (ref / STEM / STORE_DIR).exists()

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "histoseg.cli.main", *case.argv(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    deadline = time.time() + 120
    while _stored(out) < max(2, total // 3) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _stored(out)
    finished = {p.stem for p in (out / STEM / STORE_DIR).glob("*.npz")}
    assert 0 < before < total, f"kill came too late or too early: {before} of {total} regions stored"
    assert not (out / STEM / "_SUCCESS").exists()

    CALLS.clear()
    cfg = case.config()
    predictor = _counting(case, cfg)
    rep = segment_slide(case.slide, out, cfg, InProcessRunner(), predictor)
    assert rep.status == "ok"
    p = _provenance(out)["processing"]
    assert p["regions_reused"] >= before
    assert p["regions_reused"] + p["regions_computed"] == total
    assert len(CALLS) == p["regions_computed"] == len(set(CALLS))  # only the missing regions ran, once each
    assert not finished & set(CALLS)
    assert not (out / STEM / STORE_DIR).exists()
    _assert_same_outputs(out, ref)


class _Crash(Exception):
    pass


@pytest.mark.parametrize("change", ["np_threshold", "region_size"])
def test_store_of_other_settings_is_not_reused(case: Case, tmp_path: Path, change: str) -> None:
    out = tmp_path / "out"
    other = {"np_threshold": {"np_threshold": 0.9}, "region_size": {"region_size": case.region_size + 32}}[change]

    def crash_after_three(done: int, total: int) -> None:
        if done >= 3:
            raise _Crash

    with pytest.raises(_Crash):
        segment_slide(case.slide, out, case.config(**other), InProcessRunner(), on_region=crash_after_three)
    assert _stored(out) >= 3
    CALLS.clear()
    cfg = case.config()
    predictor = _counting(case, cfg)
    assert segment_slide(case.slide, out, cfg, InProcessRunner(), predictor).status == "ok"
    p = _provenance(out)["processing"]
    assert p["regions_reused"] == 0 and p["regions_computed"] == p["regions"] == len(CALLS)
    assert not (out / STEM / STORE_DIR).exists()


def test_run_killed_after_its_last_region_computes_nothing(case: Case, tmp_path: Path) -> None:
    out = tmp_path / "out"

    def crash_at_the_end(done: int, total: int) -> None:
        if done == total:
            raise _Crash

    with pytest.raises(_Crash):
        segment_slide(case.slide, out, case.config(), InProcessRunner(), on_region=crash_at_the_end)
    CALLS.clear()
    cfg = case.config()
    predictor = _counting(case, cfg)
    assert segment_slide(case.slide, out, cfg, InProcessRunner(), predictor).status == "ok"
    p = _provenance(out)["processing"]
    assert p["regions_reused"] == p["regions"] and p["regions_computed"] == 0 and CALLS == []


PLANE = PlaneInfo(
    ("epithelial", "lymphocyte", "Ünknown"), ((1, 2, 3), (250, 0, 7), (9, 9, 9)), 0.2501, 1.9992, (12345, 6789)
)


def _random_table(n: int, seed: int) -> InstanceTable:
    rng = np.random.default_rng(seed)
    masks = [rng.random((int(rng.integers(1, 9)), int(rng.integers(1, 9)))) > 0.4 for _ in range(n)]
    return InstanceTable(
        ids=np.zeros(n, np.uint32),
        anchors=rng.integers(0, 5000, (n, 2)).astype(np.int64),
        centroids=rng.random((n, 2)) * 1e4,
        bboxes=rng.random((n, 4)) * 1e4,
        class_ids=rng.integers(0, 5, n).astype(np.uint8),
        probabilities=rng.random(n).astype(np.float32),
        polygons=[rng.random((int(rng.integers(3, 40)), 2)) * 1e4 for _ in range(n)],
        masks=masks,
        mask_offsets=rng.integers(0, 5000, (n, 2)).astype(np.int64),
        measurements={"zeta": rng.random(n), "area_um2": rng.random(n), "ß-µ": rng.random(n)},
        plane=PLANE,
        edge_touching=3,
    )


def _assert_tables_equal(a: InstanceTable, b: InstanceTable) -> None:
    for c in COLUMNS:
        x, y = getattr(a, c.name), getattr(b, c.name)
        if c.is_list:
            assert len(x) == len(y), c.name
            for u, v in zip(x, y, strict=True):
                assert u.dtype == v.dtype and u.shape == v.shape and np.array_equal(u, v), c.name
        else:
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), c.name
    assert list(a.measurements) == list(b.measurements)
    for k in a.measurements:
        assert a.measurements[k].dtype == b.measurements[k].dtype
        assert np.array_equal(a.measurements[k], b.measurements[k])
    assert (a.plane, a.edge_touching) == (b.plane, b.edge_touching)


@pytest.mark.parametrize("n", [0, 1, 37])
def test_instance_table_npz_round_trip_is_exact(tmp_path: Path, n: int) -> None:
    table = _random_table(n, seed=n)
    arrays = table.to_arrays()
    assert all(v.dtype != object for v in arrays.values())  # plain arrays: loadable without pickle
    np.savez_compressed(tmp_path / "t.npz", **arrays)
    with np.load(tmp_path / "t.npz", allow_pickle=False) as z:
        _assert_tables_equal(table, InstanceTable.from_arrays(z, PLANE))
    region = Region(2, 3, Box(192, 128, 64, 64), 32)
    store = RegionStore.open(tmp_path / "out", {"any": "settings"})
    store.save(region, table)
    got = store.load(region, PLANE)
    assert got is not None
    _assert_tables_equal(table, got)


def test_store_ignores_foreign_damaged_and_misplaced_files(tmp_path: Path) -> None:
    region = Region(0, 1, Box(64, 0, 64, 64), 32)
    table = _random_table(5, seed=1)
    a = RegionStore.open(tmp_path, {"np_threshold": 0.5})
    a.save(region, table)
    assert RegionStore.open(tmp_path, {"np_threshold": 0.5}).load(region, PLANE) is not None
    b = RegionStore.open(tmp_path, {"np_threshold": 0.6})  # other settings: the old store is wiped
    assert b.load(region, PLANE) is None and not any(b.folder.glob("*.npz"))
    b.save(region, table)
    moved = Region(0, 1, Box(64, 0, 64, 64), 48)  # same key, other geometry
    assert b.load(moved, PLANE) is None and not b.path(region).exists()
    b.save(region, table)
    b.path(region).write_bytes(b.path(region).read_bytes()[:100])  # truncated file
    assert b.load(region, PLANE) is None and not b.path(region).exists()
    (b.folder / ".r00000_c00001.npz.tmp-0123").write_bytes(b"partial")  # a killed write
    assert not any(RegionStore.open(tmp_path, {"np_threshold": 0.6}).folder.glob(".*"))
