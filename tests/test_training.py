"""Training, evaluation command and losses: a tiny real run on MoNuSeg, resumed, with statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from histoseg.cli.main import main
from histoseg.datasets import Sample
from histoseg.inference import run_network
from histoseg.models import load_model, resolve_model
from histoseg.training.config import TrainConfig
from histoseg.training.data import TrainingSource
from histoseg.training.labels import CRCHISTO_TO_TYPES, DatasetSpec
from histoseg.training.losses import hv_loss, np_loss
from histoseg.training.objective import Stage, batch_loss
from histoseg.training.points import PointSupervision
from histoseg.training.targets import hv_maps
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
    inst = tgt[0].numpy().astype(np.int32)
    white = np.full((16, 16, 3), 200, np.uint8)
    s_inst = Sample(name="i", image=white, inst=inst, mpp=0.5)
    s_sem = Sample(name="s", image=white, semantic=inst > 0, mpp=0.5)
    src = TrainingSource(DatasetSpec(name="monuseg"), [s_inst, s_sem], np.full(1, -1, np.int64))
    true_hv = torch.from_numpy(hv_maps(inst))
    out = {"np": good, "hv": torch.stack([true_hv, -true_hv])}  # the semantic crop's HV is wrong: not counted
    crops = [(s_inst, 0), (s_sem, 0)]
    _, terms = batch_loss(out, torch.zeros(2, 3, 16, 16), crops, [src], PointSupervision(0.5), Stage())
    assert terms["hv"] == pytest.approx(0.0, abs=1e-7) and set(terms) == {"np", "hv"}


def test_tiny_training_run_resumes_and_records_statistics(tmp_path: Path, shared_data: Path) -> None:
    cfg = TrainConfig(
        name="tiny",
        output=str(tmp_path / "run"),
        width=8,
        crop=64,
        batch_size=2,
        iterations=4,
        val_every=2,
        warmup=1,
        threads=1,
    )
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


TYPES = ["Epithelial", "Fibroblast", "Inflammatory", "Other"]
CRC_CLASSES = dict(CRCHISTO_TO_TYPES)


def test_typed_training_from_masks_and_points_with_relations(tmp_path: Path, shared_data: Path) -> None:
    """MoNuSeg masks + CRCHisto points (random walk) in one batch stream; stage 2 measures the relations."""
    cfg = TrainConfig.from_dict(dict(
        name="typed", output=str(tmp_path / "typed"), width=8, crop=64, batch_size=4, iterations=4, val_every=2,
        warmup=1, threads=1, types=TYPES, relation_from=2,
        datasets=[{"name": "monuseg", "labels": "instances", "share": 0.5},
                  {"name": "crchisto", "labels": "points", "share": 0.5, "classes": CRC_CLASSES}],
    ))  # fmt: skip
    artifact = train(cfg, progress=False)
    net, card = load_model(resolve_model(str(artifact)))
    assert card.net.n_types == 4 and card.class_names == tuple(TYPES) and len(set(card.class_colors)) == 4
    assert "research use" in card.license and "CC BY-NC-SA 4.0" in card.license
    relations = card.training["relations"]["0"]["nucleus"]  # MoNuSeg (source 0) has no types: one soft row
    assert len(relations) == 4 and all(0.0 <= v <= 1.0 for v in relations)
    log = [json.loads(x) for x in (tmp_path / "typed" / "log.jsonl").read_text().splitlines()]
    assert any("relations" in r for r in log) and all("tp" in r for r in log if "pq" in r)
    image = np.full((64, 64, 3), 220, np.uint8)
    _, _, tp = run_network(net, card, image)
    assert tp is not None and tp.stride == card.net.type_stride and tp.full(64, 64).shape == (4, 64, 64)
    assert 0.0 <= tp.prob.min() and tp.prob.max() <= 1.0


def test_evaluate_command_writes_table_and_json(
    tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ev.json"
    assert main(["evaluate", "--dataset", "crchisto-val", "--limit", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "detection F1" in text and "radius 3.3" in text
    res = json.loads(out.read_text())
    assert len(res["images"]) == 2 and 0.0 <= res["mean"]["det_f1"] <= 1.0
    if resolve_model("default").card().net.n_types:  # a typed model is also scored on the CRCHisto classes
        assert "weighted F1" in text and 0.0 <= res["typing"]["weighted_f1"] <= 1.0
        assert set(res["typing"]["per_class_f1"]) == {"epithelial", "fibroblast", "inflammatory", "others"}


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml")))
def test_shipped_training_configs_are_valid(path: Path) -> None:
    from histoseg.training.typehead import load_type_head_config

    head = load_type_head_config(path)
    if head is not None:  # a type head on a frozen trunk: the last step of the default's and of lite's recipes
        assert path.stem == f"{head.name}-types" and head.name in {"default", "lite"}
        if head.name == "default":  # from the first step's output
            assert head.trunk == TrainConfig.load(path.with_name("default.yaml")).output + "/default.safetensors"
        else:  # the shipped lite's trunk (its own type head is replaced), as it was run
            assert head.trunk == "lite"
        assert head.types == ["Epithelial", "Fibroblast", "Inflammatory", "Other"] and head.views == 8
        return
    cfg = TrainConfig.load(path)
    typed = path.stem == "typed" or path.stem.startswith("typed-")  # the typed model's recipe: 3 configs
    lite = path.stem.startswith("lite")  # the lite model's recipe: 2 configs
    assert (
        cfg.name == path.stem
        or path.stem.startswith(("small", "base"))
        or (typed and cfg.name == "typed")
        or (lite and cfg.name == "lite")
    )
    if path.stem == "lite-distill":  # step 2: from step 1's weights, on unlabeled images of another lab too
        assert cfg.init == "runs/lite/lite.safetensors" and cfg.teacher == "default"
        assert cfg.distill_images == ["crchisto"] and cfg.distill_strong
        assert TrainConfig.load(path.with_name("lite.yaml")).net_config(0) == cfg.net_config(0)
    assert (cfg.types != []) == typed
    if path.stem.startswith("typed-distill"):  # steps 2 and 3: from the previous step's typed weights
        assert cfg.init is not None and cfg.init.startswith("runs/typed-") and cfg.init.endswith("/typed.safetensors")
        assert (cfg.point_target, cfg.teacher, cfg.relation_from) == ("hard", "default", 1)
    if path.stem == "typed":  # the typed model's recipe, starting from the untyped default's
        assert cfg.types and cfg.init == "runs/default/default.safetensors" and cfg.relation_from < cfg.iterations
        assert {d["name"] for d in cfg.datasets} == {"monuseg", "crchisto"}


def test_training_config_errors_name_the_key() -> None:
    from histoseg.errors import ConfigError

    with pytest.raises(ConfigError, match="datasets"):
        TrainConfig.from_dict({"datasets": []})
    with pytest.raises(ConfigError, match="not in types"):
        TrainConfig.from_dict({"types": ["A"], "datasets": [{"name": "crchisto", "classes": {"others": "B"}}]})
    with pytest.raises(ConfigError, match="distinct"):
        TrainConfig.from_dict({"types": ["A", "A"]})
