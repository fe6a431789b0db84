"""Training, evaluation command and losses: a tiny real run on MoNuSeg, resumed, with statistics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from histoseg.cli.main import main
from histoseg.models import load_model, resolve_model
from histoseg.training.config import TrainConfig
from histoseg.training.losses import hv_loss, np_loss, total_loss
from histoseg.training.train import train


def test_losses_prefer_the_truth_and_skip_missing_labels() -> None:
    tgt = torch.zeros(2, 16, 16, dtype=torch.long)
    tgt[:, 4:12, 4:12] = 1
    good = torch.stack([(tgt == 0).float(), (tgt == 1).float()], 1) * 10
    bad = good.flip(1)
    valid = torch.tensor([True, True])
    assert np_loss(good, tgt, valid) < np_loss(bad, tgt, valid)
    hv = torch.rand(2, 2, 16, 16) * 2 - 1
    assert float(hv_loss(hv, hv, tgt, valid)) == pytest.approx(0.0, abs=1e-7)
    assert float(hv_loss(hv * 0, hv, tgt, valid)) > 0.1
    none = torch.tensor([False, False])
    assert float(np_loss(bad, tgt, none)) == 0.0 and float(hv_loss(hv * 0, hv, tgt, none)) == 0.0
    # a semantic-only sample contributes to NP but not to HV
    batch = {"np": tgt, "hv": hv, "has_np": valid, "has_inst": torch.tensor([True, False])}
    _, terms = total_loss({"np": good, "hv": hv.clone()}, batch)
    assert terms["hv"] == pytest.approx(0.0, abs=1e-7) and set(terms) == {"np", "hv"}


def test_tiny_training_run_resumes_and_records_statistics(tmp_path: Path, shared_data: Path) -> None:
    cfg = TrainConfig(name="tiny", output=str(tmp_path / "run"), width=8, crop=64, batch_size=2,
                      iterations=4, val_every=2, warmup=1, threads=1)
    train(cfg, progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [2, 4] and all("pq" in r for r in log)
    art = resolve_model(str(tmp_path / "run" / "tiny.safetensors"))
    net, card = load_model(art)
    assert card.source_stats and len(card.source_stats) == sum(
        1 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)
    )
    assert "np_threshold" in card.postprocess and card.context_radius_px > 0
    assert "CC BY-NC-SA 4.0" in card.license
    # resume: two more iterations continue from the checkpoint, not from scratch
    cfg2 = TrainConfig(**{**cfg.to_dict(), "iterations": 6, "val_images": []})
    train(cfg2, progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [2, 4, 6]


def test_evaluate_command_writes_table_and_json(tmp_path: Path, shared_data: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ev.json"
    assert main(["evaluate", "--dataset", "crchisto-val", "--limit", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "detection F1" in text and "radius 3.3" in text
    res = json.loads(out.read_text())
    assert len(res["images"]) == 2 and 0.0 <= res["mean"]["det_f1"] <= 1.0
