"""``histoseg info`` reports real slide metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from histoseg.cli.main import main


def test_info_on_real_slides(shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    svs = shared_data / "slides" / "aperio-cmu1-small" / "CMU-1-Small-Region.svs"
    assert main(["info", str(svs), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["dimensions"] == [2220, 2967]
    assert d["mpp"] == pytest.approx(0.499, abs=1e-3)
    assert d["objective_power"] == pytest.approx(20)
    assert d["vendor"] == "aperio"
    nompp = shared_data / "slides" / "aperio-tcga-jp2k" / "tcga-cr-7395-01a-01-ts1.svs"
    assert main(["info", str(nompp)]) == 0
    out = capsys.readouterr().out
    assert "unknown (pass --slide-mpp to segment)" in out
    assert "4443 x 3567" in out and "level 1" in out
