"""Bad input: a typed exception in the library, one line and a non-zero exit in the CLI, and a batch
that still finishes the other slides."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histoseg.cli.main import main
from histoseg.config import SegmentConfig
from histoseg.distributed import InProcessRunner
from histoseg.errors import (
    CorruptSlideError,
    MissingMppError,
    NoTissueError,
    OutputError,
    SlideNotFoundError,
    SlideTooSmallError,
    UnsupportedFormatError,
    UnsupportedImageError,
)
from histoseg.pipeline import segment_batch, segment_slide

from .oracle import OraclePredictor
from .synthetic import random_nuclei, write_slide


def _err_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("histoseg: error:")]


@pytest.fixture()
def oracle_slide(tmp_path: Path) -> tuple[Path, OraclePredictor]:
    labels = random_nuclei((300, 380), 120, seed=1)
    path = write_slide(tmp_path / "good.tif", labels, 0.5)
    labels[:, int(380 * 0.85) :] = 0
    return path, OraclePredictor(labels, 0.5)


def _segment(path: Path, out: Path, oracle: OraclePredictor, **cfg: object) -> None:
    segment_slide(path, out, SegmentConfig(**cfg), InProcessRunner(), oracle)  # type: ignore[arg-type]


def test_typed_errors(tmp_path: Path, shared_data: Path, oracle_slide: tuple[Path, OraclePredictor]) -> None:
    _, oracle = oracle_slide
    out = tmp_path / "out"
    with pytest.raises(SlideNotFoundError):
        _segment(tmp_path / "missing.svs", out, oracle)
    txt = tmp_path / "notes.txt"
    txt.write_text("not a slide")
    with pytest.raises(UnsupportedFormatError):
        _segment(txt, out, oracle)
    src = shared_data / "slides" / "aperio-cmu1-small" / "CMU-1-Small-Region.svs"
    trunc = tmp_path / "trunc.svs"
    trunc.write_bytes(src.read_bytes()[: src.stat().st_size // 3])
    with pytest.raises(CorruptSlideError):
        _segment(trunc, out, oracle)
    nompp = shared_data / "slides" / "aperio-tcga-jp2k" / "tcga-cr-7395-01a-01-ts1.svs"
    with pytest.raises(MissingMppError, match="--slide-mpp"):
        _segment(nompp, out, oracle)
    fluo = shared_data / "slides" / "hamamatsu-ndpi-fluorescence" / "dapi-387.ndpi"
    with pytest.raises(UnsupportedImageError):
        _segment(fluo, out, oracle)
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((400, 400, 3), 243, np.uint8)).save(blank)
    with pytest.raises(NoTissueError):
        _segment(blank, out, oracle, slide_mpp=0.5)
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.full((10, 10, 3), (200, 120, 180), np.uint8)).save(tiny)
    with pytest.raises(SlideTooSmallError):
        _segment(tiny, out, oracle, slide_mpp=0.5)
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    path, _ = oracle_slide
    with pytest.raises(OutputError):
        _segment(path, blocker, oracle)


def test_slide_smaller_than_one_region_is_processed(oracle_slide: tuple[Path, OraclePredictor], tmp_path: Path) -> None:
    path, oracle = oracle_slide  # 380 x 300 px, region 1024
    _segment(path, tmp_path / "out", oracle)
    assert (tmp_path / "out" / "good" / "_SUCCESS").exists()


def test_batch_carries_on_and_reports_failures(
    tmp_path: Path, shared_data: Path, oracle_slide: tuple[Path, OraclePredictor]
) -> None:
    good, oracle = oracle_slide
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(good, folder / "a_good.tif")
    (folder / "b_broken.svs").write_bytes(b"\x00" * 1000)
    shutil.copy(good, folder / "c_good.tif")
    reports = segment_batch(
        [str(folder), str(tmp_path / "nope.svs")],
        tmp_path / "out",
        SegmentConfig(),
        runner=InProcessRunner(),
        predictor=oracle,
    )
    status = {Path(r.slide).name: r.status for r in reports}
    assert status == {"a_good.tif": "ok", "b_broken.svs": "failed", "c_good.tif": "ok", "nope.svs": "failed"}
    assert (tmp_path / "out" / "c_good" / "_SUCCESS").exists()
    assert not (tmp_path / "out" / "b_broken").exists()


def test_cli_one_line_errors_and_exit_codes(
    tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nompp = shared_data / "slides" / "aperio-tcga-jp2k" / "tcga-cr-7395-01a-01-ts1.svs"
    assert main(["segment", str(nompp), "-o", str(tmp_path / "o")]) == 1
    errs = _err_lines(capsys)
    assert len(errs) == 1 and "--slide-mpp" in errs[0]
    assert main(["info", str(tmp_path / "missing.svs")]) == 1
    assert len(_err_lines(capsys)) == 1
    assert main(["segment", str(tmp_path / "x.svs"), "-o", str(tmp_path), "--formats", "pdf"]) == 1
    assert "unknown output format" in _err_lines(capsys)[0]
    assert main(["segment", str(tmp_path / "x.svs"), "-o", str(tmp_path), "--model", "no-such-model"]) == 1
    assert "no-such-model" in _err_lines(capsys)[0]
