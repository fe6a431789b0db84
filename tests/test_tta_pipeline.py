"""Per-slide adaptation inside ``segment`` and ``adapt``: provenance, the artifact, reuse, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from histoseg.cli.main import main
from histoseg.models import resolve_model

from .conftest import make_demo_slide


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_slide(tmp_path_factory.mktemp("tta_sample") / "demo.tif", 1024, 5)


def _provenance(out: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((out / "demo" / "provenance.json").read_text())


def test_segment_with_g2p_records_the_adaptation(sample: Path, tmp_path: Path) -> None:
    out = tmp_path / "g2p"
    args = ["segment", str(sample), "-o", str(out), "--tta", "g2p", "--tta-regions", "2", "--tta-steps", "3",
            "--region-size", "256"]
    assert main(args) == 0
    rep = _provenance(out)["adaptation"]
    assert rep["method"] == "g2p" and rep["regions"] == 2 and rep["settings"]["steps"] == 3
    assert rep["loss_before"] >= 0 and len(rep["loss_history"]) >= 1
    assert rep["source_weights_sha256"] == resolve_model("default").sha256()
    model = _provenance(out)["model"]
    if rep["kept_source"]:
        assert rep["guard"] and rep["weights_sha256"] == rep["source_weights_sha256"]
        assert model["sha256"] == rep["source_weights_sha256"]
    else:
        assert rep["loss_after"] < rep["loss_before"]
        assert rep["g2p_ratios"] and all(v >= 0 for v in rep["g2p_ratios"].values())
        adapted = out / "demo" / "demo.adapted.safetensors"
        assert adapted.exists() and model["sha256"] == rep["weights_sha256"] != rep["source_weights_sha256"]


def test_adapted_segmentation_is_the_same_with_one_or_two_workers(sample: Path, tmp_path: Path) -> None:
    tables = []
    for w in (1, 2):
        out = tmp_path / f"w{w}"
        args = ["segment", str(sample), "-o", str(out), "--tta", "bn", "--tta-regions", "2", "--workers", str(w),
                "--region-size", "512", "--formats", "parquet"]
        assert main(args) == 0
        tables.append(pq.read_table(out / "demo" / "demo.nuclei.parquet"))
        assert _provenance(out)["adaptation"]["kept_source"] is False
    a, b = tables
    assert a.num_rows > 50
    assert a.equals(b)


def test_adapt_writes_weights_that_segment_reuses(
    sample: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "adapted.safetensors"
    assert main(["adapt", str(sample), "--output", str(weights), "--tta", "bn", "--tta-regions", "2"]) == 0
    assert weights.exists() and weights.with_suffix(".json").exists()
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["training"]["adapted_from"] == resolve_model("default").sha256()
    out = tmp_path / "reuse"
    assert main(["segment", str(sample), "-o", str(out), "--model", str(weights), "--formats", "parquet"]) == 0
    prov = _provenance(out)
    assert prov["model"]["weights"] == str(weights)
    assert pq.read_table(out / "demo" / "demo.nuclei.parquet").num_rows > 50
    capsys.readouterr()
    assert main(["adapt", str(sample), "--output", str(tmp_path / "x.safetensors"), "--tta", "none"]) != 0
    assert "needs a method" in capsys.readouterr().err
