"""QC reports on a real run: the shipped model segments the embedded demo slide (``sample_data/make_sample.py``),
then the slide report and the batch index are checked as files (sections, embedded images that decode,
class colours in the overlays, outlier flags on planted slides), rebuilt with ``histoseg report`` and rendered
in headless Chromium (Debian's ``chromium``; ``.ci/run`` installs it)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import shapely

from histoseg.cli.main import main
from histoseg.config import SegmentConfig
from histoseg.pipeline import SlideReport
from histoseg.report import (
    build_batch_index,
    build_slide_report,
    index_after_batch,
    report_after_slide,
    write_batch_index,
)
from histoseg.report.slide_report import SECTIONS

from .conftest import make_demo_slide

IMG = re.compile(r'<img src="data:(image/(?:png|jpeg));base64,([A-Za-z0-9+/=]+)"([^>]*)>')


@pytest.fixture(scope="module")
def run_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real segment run (shipped model, fp32, no adaptation) of a 1536² demo slide: OUT folder."""
    sample = make_demo_slide(tmp_path_factory.mktemp("report_sample") / "demo.tif", 1536, 2)
    out = tmp_path_factory.mktemp("report_out")
    args = ["segment", str(sample), "-o", str(out), "--tta", "none", "--precision", "fp32", "--workers", "1"]
    assert main(args) == 0
    return out


def _images(page: str) -> list[tuple[str, np.ndarray, str]]:
    out = []
    for mime, b64, attrs in IMG.findall(page):
        pixels = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_COLOR)
        assert pixels is not None, f"an embedded {mime} does not decode"
        out.append((mime, cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB), attrs))
    return out


def test_slide_report_has_every_section_and_valid_images(run_out: Path) -> None:
    page = (run_out / "demo" / "report.html").read_text(encoding="utf-8")
    for ident in SECTIONS:
        assert f'<section id="{ident}">' in page
    assert "http://" not in page and "https://" not in page  # self-contained: nothing to fetch
    images = _images(page)
    assert len(images) == page.count("<img ")
    overlays = [im for _, im, attrs in images if 'class="overlay"' in attrs]
    raws = [im for _, im, attrs in images if 'class="raw"' in attrs]
    assert 3 <= len(overlays) == len(raws) <= 6
    assert all(o.shape == r.shape == (256, 256, 3) for o, r in zip(overlays, raws, strict=True))
    labels = re.findall(r'<div class="field" data-label="([^"]+)"', page)
    assert labels[0] == "densest" and labels[-1] == "sparsest" and "median" in labels
    counts = [int(n) for n in re.findall(r"</b> — (\d+) nuclei", page)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    assert "no adaptation" in page  # --tta none, recorded in provenance
    assert (run_out / "index.html").is_file()


def _recolored(run_out: Path, dest: Path) -> tuple[Path, pa.Table]:
    """A copy of the demo output whose nuclei alternate between class 1 and a planted class 2 (green)."""
    shutil.copytree(run_out / "demo", dest)
    path = dest / "demo.nuclei.parquet"
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"histoseg"])
    meta["class_names"] = ["Nucleus", "Planted"]
    meta["class_colors"] = [[200, 40, 160], [0, 200, 0]]
    cls = np.where(np.arange(table.num_rows) % 2 == 0, 1, 2).astype(np.uint8)
    names = pa.DictionaryArray.from_arrays(pa.array(cls.astype(np.int32)), pa.array(["unclassified", "Nucleus",
                                                                                    "Planted"]))  # fmt: skip
    table = table.set_column(table.schema.get_field_index("class_id"), "class_id", pa.array(cls))
    table = table.set_column(table.schema.get_field_index("class_name"), "class_name", names)
    table = table.replace_schema_metadata({**table.schema.metadata, b"histoseg": json.dumps(meta).encode()})
    pq.write_table(table, path)
    return dest, table


def test_overlay_pixels_carry_the_class_colour(run_out: Path, tmp_path: Path) -> None:
    folder, table = _recolored(run_out, tmp_path / "demo")
    page = build_slide_report(folder)
    assert "Planted" in page
    colours = {1: (200, 40, 160), 2: (0, 200, 0)}
    checked = {1: 0, 2: 0}
    polys = shapely.from_wkb(np.asarray(table["polygon"].to_pylist(), dtype=object))
    tree = shapely.STRtree(polys)
    for _, overlay, attrs in (im for im in _images(page) if 'class="overlay"' in im[2]):
        x, y, w, h = (float(v) for v in re.search(r'data-box="([^"]+)"', attrs).group(1).split())  # type: ignore[union-attr]
        inside = (pc.greater(table["bbox_x0"], x + 4).to_numpy() & pc.less(table["bbox_x1"], x + w - 4).to_numpy()
                  & pc.greater(table["bbox_y0"], y + 4).to_numpy() & pc.less(table["bbox_y1"], y + h - 4).to_numpy())
        rows = np.flatnonzero(inside)
        assert len(rows), "a field without a whole nucleus"
        for i in rows:
            poly = polys[i]
            near = tree.query(poly, predicate="dwithin", distance=6.0)
            if len(near) > 1:
                continue  # a touching neighbour's outline may be drawn over this one's
            cid = int(table["class_id"][int(i)].as_py())
            # every vertex's pixel lies on the outline, drawn in the exact class colour
            xy = np.floor((np.asarray(poly.exterior.coords) - (x, y)) * (overlay.shape[1] / w)).astype(int)
            on = overlay[xy[:, 1], xy[:, 0]]
            hits = np.all(on == colours[cid], axis=1).mean()
            assert hits >= 0.9, f"nucleus {i}: only {hits:.2f} of its outline in its class colour"
            checked[cid] += 1
    assert checked[1] >= 3 and checked[2] >= 3, checked


def _planted_batch(run_out: Path, root: Path) -> Path:
    """Six copies of the demo output: four normal (a few % of nuclei dropped), one with 85 % dropped (density
    outlier) and one with 60 % of nuclei moved to another class (class-mix outlier)."""
    rng = np.random.default_rng(0)
    plan = {"s1": 0.00, "s2": 0.03, "s3": 0.05, "s4": 0.08, "sparse": 0.85, "mixed": 0.02}
    for name, drop in plan.items():
        folder = root / name
        shutil.copytree(run_out / "demo", folder)
        path = folder / "demo.nuclei.parquet"
        table = pq.read_table(path)
        table = table.filter(pa.array(rng.random(table.num_rows) >= drop))
        if name == "mixed":
            cls = np.where(rng.random(table.num_rows) < 0.6, 2, 1).astype(np.uint8)
            table = table.set_column(table.schema.get_field_index("class_id"), "class_id", pa.array(cls))
            names = pa.DictionaryArray.from_arrays(pa.array(cls.astype(np.int32)), pa.array(["u", "Nucleus", "Other"]))
            table = table.set_column(table.schema.get_field_index("class_name"), "class_name", names)
        else:  # the same class name as "mixed" uses for class 1, whatever the exporter calls it
            ones = pa.array(np.ones(table.num_rows, np.int32))
            names = pa.DictionaryArray.from_arrays(ones, pa.array(["u", "Nucleus"]))
            table = table.set_column(table.schema.get_field_index("class_name"), "class_name", names)
        pq.write_table(table, path)
        (folder / "report.html").unlink()
    return root


def _rows(page: str) -> dict[str, str]:
    body = page.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    out = {}
    for row in re.findall(r"<tr[^>]*>.*?</tr>", body):
        name = re.findall(r"<td>(?:<a [^>]+>)?([\w.-]+)(?:</a>)?</td>", row)
        out[name[0]] = row
    return out


def test_outlier_flags_fire_on_planted_slides_only(run_out: Path, tmp_path: Path) -> None:
    root = _planted_batch(run_out, tmp_path / "batch")
    failed = SlideReport(str(tmp_path / "gone.svs"), "failed", message="slide not found: gone.svs")
    rows = _rows(build_batch_index(root, [failed]))
    assert set(rows) == {"s1", "s2", "s3", "s4", "sparse", "mixed", "gone"}
    assert 'class="outlier"' in rows["sparse"] and "density" in rows["sparse"] and "below" in rows["sparse"]
    assert 'class="outlier"' in rows["mixed"] and "class mix" in rows["mixed"]
    for name in ("s1", "s2", "s3", "s4"):
        assert 'class="outlier"' not in rows[name]
    assert "failed" in rows["gone"] and "slide not found" in rows["gone"]
    assert 'href="s1/report.html"' not in rows["s1"]  # no report in that folder: no link


def test_report_command_rebuilds_identical_pages(run_out: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(run_out, out)
    original = (out / "demo" / "report.html").read_bytes()
    (out / "demo" / "report.html").unlink()
    (out / "index.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "demo" / "report.html").read_bytes() == original  # same files, same page
    assert 'href="demo/report.html"' in (out / "index.html").read_text(encoding="utf-8")
    assert main(["report", str(tmp_path / "missing")]) == 1


def test_reports_off(run_out: Path, tmp_path: Path) -> None:
    shutil.copytree(run_out / "demo", tmp_path / "demo")
    (tmp_path / "demo" / "report.html").unlink()
    assert report_after_slide(tmp_path / "demo", SegmentConfig(report=False)) is None
    rep = SlideReport("demo.tif", "ok", output=str(tmp_path / "demo"))
    assert index_after_batch(tmp_path, [rep], report=False) is None
    assert not (tmp_path / "demo" / "report.html").exists() and not (tmp_path / "index.html").exists()
    from histoseg.cli.main import build_parser

    assert build_parser().parse_args(["segment", "x.tif", "-o", "o", "--no-report"]).report is False


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        msg = "chromium not installed (apt-get install chromium; .ci/run installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def _browse(page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0", *extra, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


def test_pages_render_in_headless_chromium(run_out: Path, tmp_path: Path) -> None:
    shots = Path(os.environ.get("HISTOSEG_REPORT_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    root = _planted_batch(run_out, tmp_path / "batch")
    shutil.copy(run_out / "demo" / "report.html", root / "s1" / "report.html")
    index = write_batch_index(root)
    for page, size in ((root / "s1" / "report.html", "1280,4200"), (index, "1280,1100")):
        png = shots / f"{page.stem}.png"
        res = _browse(page, tmp_path, f"--screenshot={png}", f"--window-size={size}")
        assert res.returncode == 0, res.stderr[-2000:]
        console = [line for line in res.stderr.splitlines() if ":CONSOLE" in line]
        assert not console, f"{page.name}: console messages {console}"
        shot = cv2.imread(str(png))
        assert shot is not None and shot.shape[1] == 1280
        assert (shot < 200).mean() > 0.02  # something was drawn, not a blank page
    # the sort script works in a real browser: click "nuclei" once (ascending), read the first row back
    probe = root / "probe.html"
    click = ('<script>document.querySelectorAll("th.sortable")[2].click();document.body.setAttribute('
             '"data-first",document.querySelector("#slides tbody tr td:nth-child(2)").textContent);</script></body>')
    probe.write_text(index.read_text(encoding="utf-8").replace("</body>", click), encoding="utf-8")
    res = _browse(probe, tmp_path, "--dump-dom")
    assert res.returncode == 0 and 'data-first="sparse"' in res.stdout, res.stdout[-500:]
    assert not [line for line in res.stderr.splitlines() if ":CONSOLE" in line]
