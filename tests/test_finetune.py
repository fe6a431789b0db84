"""``histoseg finetune`` from point clicks written exactly as QuPath exports them, then ``segment --model``.

CRCHisto training images stand in for two slides (plain PNGs at 0.55 µm/px); their points are written with
QuPath's export format (``write_qupath_points``: one MultiPoint annotation per class, QuPath's pixel
convention) under pathologist-style class names: two of them new to the model ("Tumor", "Lymphocyte").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from histoseg.cli.main import main
from histoseg.datasets import CRCHISTO_CLASSES, load_crchisto
from histoseg.datasets.qupath_points import pixel_centres_to_qupath, write_qupath_points
from histoseg.models import ModelCard, resolve_model

NAMES = {"epithelial": "Tumor", "fibroblast": "Fibroblast", "inflammatory": "Lymphocyte", "others": "Other"}
COLOURS = {"Tumor": (200, 0, 0), "Lymphocyte": (160, 90, 160)}


@pytest.fixture(scope="module")
def clicks(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[str]]:
    tmp = tmp_path_factory.mktemp("clicks")
    base = shared_data / "nuclei" / "crchisto" / "train"
    slides, points = [], []
    for s in load_crchisto("train", None)[:2]:
        keep = s.point_classes > 0  # type: ignore[operator]
        names = [NAMES[CRCHISTO_CLASSES[c - 1]] for c in s.point_classes[keep]]  # type: ignore[index]
        path = tmp / f"{s.name}.geojson"
        write_qupath_points(path, pixel_centres_to_qupath(s.points[keep]), names, COLOURS)  # type: ignore[index]
        slides.append(str(base / s.name / f"{s.name}.png"))
        points.append(str(path))
    return slides, points


@pytest.mark.parametrize("model", ["default", "typed"])
def test_finetune_from_qupath_points_then_segment_with_it(
    clicks: tuple[list[str], list[str]], tmp_path: Path, model: str
) -> None:
    """From the untyped default (the clicked classes become the types) and from the typed model (matching
    names train existing types, new ones join, initialised from the measured relations). The typed case gives
    the points before the slides (``finetune --points FILE... SLIDE...``, the issue's order)."""
    slides, points = clicks
    out = tmp_path / "mine.safetensors"
    given = [*slides, "--points", *points] if model == "default" else ["--points", *points, *slides]
    args = ["finetune", *given, "--output", str(out), "--slide-mpp", "0.55", "--iterations", "3", "--model", model]
    assert main(args) == 0
    card = ModelCard.load(out.with_suffix(".json"))
    base = resolve_model(model).card()
    old = list(base.class_names) if base.net.n_types else []
    # the model's own types are kept in order; the clicked classes join (matching names are not duplicated)
    assert list(card.class_names[: len(old)]) == old
    assert {"Tumor", "Lymphocyte", "Fibroblast", "Other"} <= set(card.class_names)
    assert card.type_weights is None  # a new label space: the base model's type weights do not carry over
    assert len({n.lower() for n in card.class_names}) == len(card.class_names)
    assert card.net.n_types == len(card.class_names)
    assert card.class_colors[card.class_names.index("Tumor")] == COLOURS["Tumor"]
    assert card.training["finetune"]["points"] > 100 and card.source_stats
    # the fine-tuned model is used by segment like any model
    seg = tmp_path / "seg"
    cmd = ["segment", slides[0], "--model", str(out), "--slide-mpp", "0.55", "-o", str(seg), "--tta", "none",
           "--workers", "1", "--no-report"]  # fmt: skip
    assert main(cmd) == 0
    stem = Path(slides[0]).stem
    feats = json.loads((seg / stem / f"{stem}.geojson").read_text())["features"]
    assert len(feats) > 20
    assert {f["properties"]["classification"]["name"] for f in feats} <= set(card.class_names)


def test_points_and_slides_come_in_either_order(capsys: pytest.CaptureFixture[str]) -> None:
    from histoseg.cli.learn import points_and_slides
    from histoseg.cli.main import build_parser

    def parsed(*argv: str) -> tuple[list[str], list[str]]:
        args = build_parser().parse_args(["finetune", *argv, "--output", "m.safetensors"])
        return points_and_slides(args.points, args.slides)

    want = (["a.geojson", "b.JSON"], ["s1.svs", "s2.ome.zarr"])
    assert parsed("s1.svs", "s2.ome.zarr", "--points", "a.geojson", "b.JSON") == want  # the README's order
    assert parsed("--points", "a.geojson", "b.JSON", "s1.svs", "s2.ome.zarr") == want  # the order
    assert parsed("--points", "a.geojson", "--points", "b.JSON", "s1.svs", "s2.ome.zarr") == want
    assert parsed("s1.svs", "--points", "clicks.txt") == (["clicks.txt"], ["s1.svs"])  # slides given apart: as is
    # no slide at all: one line, exit code 1, nothing written
    assert main(["finetune", "--points", "a.geojson", "--output", "m.safetensors"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("histoseg: error: finetune needs the slides") and err.count("\n") == 1


def test_finetune_rejects_bad_input(clicks: tuple[list[str], list[str]], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    slides, points = clicks
    out = str(tmp_path / "x.safetensors")
    assert main(["finetune", *slides, "--points", points[0], "--output", out, "--slide-mpp", "0.55"]) == 1
    assert "one points file per slide" in capsys.readouterr().err
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    assert main(["finetune", slides[0], "--points", str(bad), "--output", out, "--slide-mpp", "0.55"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("histoseg: error:") and "bad.geojson" in err and err.count("\n") == 1
    far = tmp_path / "far.geojson"
    write_qupath_points(far, np.array([[1e6, 1e6]]), ["Tumor"])
    assert main(["finetune", slides[0], "--points", str(far), "--output", out, "--slide-mpp", "0.55"]) == 1
    assert "none of the 1 points" in capsys.readouterr().err
    assert not Path(out).exists()
