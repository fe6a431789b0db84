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
