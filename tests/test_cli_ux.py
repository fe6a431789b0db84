"""What a user sees: ``segment --help`` shows every default and worked examples; progress names the slow
stages (adaptation, export) so it never sits silent at 0."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from histoseg.cli.main import build_parser
from histoseg.config import SegmentConfig
from histoseg.pipeline import segment_batch


def _segment_help(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["segment", "--help"])
    return capsys.readouterr().out


def test_segment_help_shows_defaults_and_examples(capsys: pytest.CaptureFixture[str]) -> None:
    text = _segment_help(capsys)
    options = text[text.index("options:"): text.index("examples:")]
    # one entry per option: "  --flag ..." up to the next line that starts an option
    entries = {m.group(1): " ".join(m.group(0).split())
               for m in re.finditer(r"^  (-{1,2}[\w-]+)(?:, --[\w-]+)?.*?(?=^  -|\Z)", options, flags=re.M | re.S)}
    for flag, default in (("--region-size", "1024"), ("--precision", "auto"), ("--tta", "auto"),
                          ("--formats", "geojson,zarr,parquet"), ("--model", "default"), ("--runtime", "auto"),
                          ("--tta-regions", "4"), ("--tta-steps", "10"), ("--cluster", "local"), ("--views", "1")):
        assert f"default: {default}" in entries[flag], (flag, entries[flag])
    assert "(default: None)" not in text and "(default: False)" not in text
    examples = " ".join(text[text.index("examples:"):].replace("\\\n", " ").split())
    commands = re.findall(r"histoseg (segment .*?)(?= # |$)", examples)
    assert len(commands) >= 4
    for piece in ("--workers 2", "--cluster slurm", "--slide-mpp"):
        assert piece in examples
    for cmd in commands:  # every worked example parses
        args = build_parser().parse_args(cmd.replace('"', "").split())
        assert args.command == "segment" and args.inputs


def test_progress_names_the_stages(tmp_path: Path) -> None:
    import cv2

    img = np.full((320, 320, 3), (230, 170, 200), np.uint8)
    for y, x in ((60, 60), (150, 200), (250, 100)):
        cv2.circle(img, (x, y), 7, (90, 40, 120), -1)
    png = tmp_path / "tiny.png"
    cv2.imwrite(str(png), img[..., ::-1])
    stages: list[str] = []
    regions: list[tuple[int, int]] = []
    cfg = SegmentConfig(slide_mpp=0.5, tta="none", report=False, formats=("parquet",))
    reports = segment_batch([str(png)], tmp_path / "out", cfg, on_stage=stages.append,
                            on_region=lambda d, t: regions.append((d, t)))
    assert reports[0].status == "ok", reports[0].message
    assert stages[0] == "planning regions" and stages[1] == "regions" and stages[-1].startswith("writing")
    assert regions and regions[-1][0] == regions[-1][1]


def test_models_lists_each_shipped_model_from_its_card(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``histoseg models``: one row per shipped model with its types, resolution, halo, the card's accuracy and
    its human-readable card (a file that exists); ``--json`` the same records with the licence text."""
    import json

    from histoseg.cli.main import main
    from histoseg.cli.models import model_row, table_lines
    from histoseg.models import registered_models, resolve_model

    from .nets import untyped_copy

    assert main(["models"]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split()[:2] == ["model", "types"] and "MoNuSeg-test PQ" in header
    names = registered_models()
    assert [line.split()[0] for line in lines] == names and "lite" in names
    for name, line in zip(names, lines, strict=True):
        card = resolve_model(name).card()
        assert ", ".join(card.class_names) in line and f" {card.halo_px()} " in line
        assert f" {card.metrics['monuseg_test']['mean']['pq']:.3f} " in line
        assert f" {card.metrics['crchisto_typing']['weighted_f1']:.3f} " in line
        assert Path(line.split()[-1]).is_file() and line.endswith("MODEL_CARD.md")
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == names
    lite = rows[names.index("lite")]
    assert lite["types"] == ["Epithelial", "Fibroblast", "Inflammatory", "Other"] and lite["mpp"] == 0.5
    assert "research use" in lite["license"] and lite["crchisto_detection_f1"] > 0.5
    # a model file of the user's own, untyped and without figures: "untyped", "-" for what its card lacks
    own = model_row(str(untyped_copy("lite", tmp_path)))
    assert own["types"] == [] and own["crchisto_weighted_class_f1"] is None and own["card"].endswith(".json")
    row = table_lines([own])[1]
    assert "untyped (Nucleus)" in row and f" {own['monuseg_test_pq']:.3f} " in row and "  -  " in row


@pytest.mark.parametrize(
    "option, message",
    [(["--region-size", "0"], "--region-size must be"), (["--workers", "0"], "--workers must be >= 1"),
     (["--formats", "tiff"], "unknown output format"), (["--slide-mpp", "1000"], "--slide-mpp must be between")],
)
def test_a_bad_segment_option_is_answered_before_torch_loads(tmp_path: Path, option: list[str], message: str) -> None:
    """The orchestration imports torch (seconds); a mistyped option is a one-line error without it."""
    import subprocess
    import sys

    argv = ["segment", str(tmp_path / "slide.tif"), "-o", str(tmp_path / "out"), *option]
    code = f"import sys; from histoseg.cli.main import main; rc = main({argv!r}); print(rc, 'torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["1", "False"], (run.stdout, run.stderr)
    errors = [line for line in run.stderr.splitlines() if line.startswith("histoseg: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "out").exists()


def test_no_slides_is_one_error_line_without_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from histoseg.cli.main import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a slide")
    assert main(["segment", str(tmp_path / "empty"), "-o", str(tmp_path / "out")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines()[-1] == "histoseg: error: no slides found in the given inputs"
    assert not (tmp_path / "out").exists()
