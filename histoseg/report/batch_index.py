"""``OUT/index.html``: one sortable row per slide of a batch, with outliers flagged.

Rows come from the slide folders in ``OUT`` (the same files the slide reports read) and, when called at
the end of ``segment_batch``, from the batch's own per-slide results (so a slide that failed before it had
a folder is listed too). Outliers are found with robust statistics that one bad slide cannot hide:

* density: modified z-score (Iglewicz & Hoaglin) of log10(nuclei per mm² of tissue) against the batch
  median and MAD, flagged when ``|z| > Z_LIMIT``; the MAD has a floor so a batch of near-identical slides
  does not flag a slide for a few percent;
* class mix: total-variation distance between a slide's class fractions and the batch's per-class median
  fractions, flagged when its modified z-score exceeds ``Z_LIMIT`` and the distance exceeds
  ``MIX_MIN_DISTANCE``.

Statistics need at least ``MIN_SLIDES`` slides with values; smaller batches get no flags.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

import histoseg
from histoseg.atomic import atomic_file
from histoseg.config import SlideStatus
from histoseg.errors import HistosegError
from histoseg.io import open_slide
from histoseg.report.data import SlideOutputs, load_slide_outputs, slide_folders
from histoseg.report.figures import encode_jpeg
from histoseg.report.html import SORT_SCRIPT, esc, fmt, img, page

__all__ = [
    "INDEX_NAME", "BatchRow", "build_batch_index", "flag_outliers", "index_after_batch", "modified_z",
    "write_batch_index",
]  # fmt: skip

log = logging.getLogger(__name__)

INDEX_NAME = "index.html"
THUMB_PX = 160
Z_LIMIT = 3.5
MIN_SLIDES = 4
LOG_DENSITY_MAD_FLOOR = 0.05  # log10 units (~12 %)
MIX_MAD_FLOOR = 0.02
MIX_MIN_DISTANCE = 0.1


class SlideResult(Protocol):
    """What the index needs of a batch's per-slide result (``histoseg.pipeline.SlideReport``)."""

    slide: str
    status: SlideStatus
    message: str
    seconds: float
    output: str | None


@dataclass
class BatchRow:
    """One slide of the index."""

    stem: str
    status: str  # ok | skipped | failed | incomplete
    message: str = ""
    nuclei: int | None = None
    density: float | None = None  # nuclei per mm² of tissue
    class_mix: dict[str, float] = field(default_factory=dict)  # class name -> fraction
    colors: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    shift_score: float | None = None
    seconds: float | None = None
    thumb: bytes | None = None
    has_report: bool = False
    flags: list[str] = field(default_factory=list)


def modified_z(values: np.ndarray, mad_floor: float) -> np.ndarray:
    """0.6745 (x - median) / max(MAD, floor): about a z-score for normal data, robust to outliers."""
    med = float(np.median(values))
    mad = max(float(np.median(np.abs(values - med))), mad_floor)
    return np.asarray(0.6745 * (values - med) / mad, dtype=np.float64)


def flag_outliers(rows: Sequence[BatchRow]) -> None:
    """Append a reason to ``flags`` of every row whose density or class mix is far from the batch's."""
    dens = [r for r in rows if r.density is not None and r.density > 0]
    if len(dens) >= MIN_SLIDES:
        logd = np.log10([r.density for r in dens])  # type: ignore[arg-type]
        med = float(np.median(logd))
        for r, z, ld in zip(dens, modified_z(logd, LOG_DENSITY_MAD_FLOOR), logd, strict=True):
            if abs(z) > Z_LIMIT:
                ratio = 10 ** (ld - med)
                way = f"{ratio:.1f}x above" if ratio >= 1 else f"{1 / ratio:.1f}x below"
                r.flags.append(f"density {way} the batch median (z = {z:+.1f})")
    mixed = [r for r in rows if r.class_mix]
    names = sorted({k for r in mixed for k in r.class_mix})
    if len(mixed) >= MIN_SLIDES and len(names) > 1:
        frac = np.array([[r.class_mix.get(k, 0.0) for k in names] for r in mixed])
        med_mix = np.median(frac, axis=0)
        med_mix = med_mix / med_mix.sum() if med_mix.sum() > 0 else med_mix
        dist = 0.5 * np.abs(frac - med_mix).sum(axis=1)
        for r, z, d, f in zip(mixed, modified_z(dist, MIX_MAD_FLOOR), dist, frac, strict=True):
            if z > Z_LIMIT and d > MIX_MIN_DISTANCE:
                k = int(np.argmax(np.abs(f - med_mix)))
                r.flags.append(f"class mix off by {100 * d:.0f} % (most: {names[k]} {100 * f[k]:.0f} % vs "
                               f"{100 * med_mix[k]:.0f} %; z = {z:+.1f})")  # fmt: skip


def _thumb(outputs: SlideOutputs) -> bytes | None:
    path, cfg = outputs.slide_path, outputs.provenance.get("config", {})
    try:
        if path:
            with open_slide(path, backend=cfg.get("backend", "auto"), mpp=cfg.get("slide_mpp")) as reader:
                return encode_jpeg(reader.thumbnail(THUMB_PX)[0], 80)
    except HistosegError:
        pass  # the slide moved or is unreadable: show the tissue mask instead
    if outputs.tissue is None:
        return None
    mask = outputs.tissue
    s = THUMB_PX / max(mask.shape)
    size = (max(1, round(mask.shape[1] * s)), max(1, round(mask.shape[0] * s)))
    small = cv2.resize(mask.astype(np.uint8) * 255, size, interpolation=cv2.INTER_AREA)
    return encode_jpeg(np.repeat((255 - small // 4)[..., None], 3, axis=2), 80)


def _row(folder: Path) -> BatchRow:
    out = load_slide_outputs(folder, measures=False)
    row = BatchRow(stem=folder.name, status="ok" if out.success else "incomplete")
    row.has_report = (folder / "report.html").is_file()
    p = out.provenance
    if out.nuclei is not None:
        counts = out.nuclei.class_counts()
        total = max(1, sum(counts.values()))
        row.nuclei = len(out.nuclei)
        row.class_mix = {k: v / total for k, v in counts.items()}
        row.colors = {out.nuclei.class_names.get(c, f"class {c}"): out.nuclei.color_of(c)
                      for c in np.unique(out.nuclei.class_ids).tolist()}  # fmt: skip
    elif isinstance(p.get("nuclei"), int):
        row.nuclei = int(p["nuclei"])
    row.density = out.density_per_mm2()
    shift = p.get("adaptation", {}).get("shift_score")
    row.shift_score = float(shift) if isinstance(shift, (int, float)) and math.isfinite(shift) else None
    total_s = p.get("timings_s", {}).get("total")
    row.seconds = float(total_s) if isinstance(total_s, (int, float)) else None
    if not out.success:
        row.message = "no _SUCCESS: the run did not finish"
    row.thumb = _thumb(out)
    return row


def _rows(out_root: Path, results: Iterable[SlideResult] | None) -> list[BatchRow]:
    rows = {}
    for folder in slide_folders(out_root):
        try:
            rows[folder.name] = _row(folder)
        except HistosegError as exc:
            rows[folder.name] = BatchRow(folder.name, "incomplete", message=str(exc))
    for res in results or ():
        stem = Path(res.output).name if res.output else Path(res.slide).stem
        row = rows.setdefault(stem, BatchRow(stem, res.status))
        row.status = res.status
        if res.status == "failed":
            row.message = res.message
        elif res.status == "ok" and res.seconds:
            row.seconds = res.seconds
    return [rows[k] for k in sorted(rows)]


def _mix_cell(row: BatchRow) -> str:
    if not row.class_mix:
        return "<td>—</td>"
    segs = "".join(
        f'<span title="{esc(k)} {100 * v:.1f} %" style="display:inline-block;height:12px;width:{100 * v:.2f}%;'
        f'background:rgb{row.colors.get(k, (160, 160, 160))}"></span>'
        for k, v in row.class_mix.items()
    )
    text = ", ".join(f"{esc(k)} {100 * v:.0f} %" for k, v in row.class_mix.items())
    top = max(row.class_mix.values())
    return (f'<td data-v="{top:.4f}"><div style="width:140px;border:1px solid #999;line-height:0">{segs}</div>'
            f'<small>{text}</small></td>')  # fmt: skip


def _num(value: float | int | None, digits: int = 3) -> str:
    if value is None:
        return '<td class="num" data-v="">—</td>'
    return f'<td class="num" data-v="{float(value):.6g}">{fmt(value, digits)}</td>'


def _html_row(row: BatchRow) -> str:
    name = esc(row.stem)
    link = f'<a href="{esc(row.stem)}/report.html">{name}</a>' if row.has_report else name
    thumb = img(row.thumb, "image/jpeg", f"{row.stem} thumbnail") if row.thumb else ""
    status_cls = {"ok": "ok", "skipped": "ok", "failed": "bad"}.get(row.status, "warn")
    status = f'<span class="{status_cls}">{esc(row.status)}</span>'
    if row.message:
        status += f"<br><small>{esc(row.message)}</small>"
    flags = "<br>".join(esc(f) for f in row.flags)
    css = ' class="outlier"' if row.flags else ""
    return (f"<tr{css}><td>{thumb}</td><td>{link}</td><td>{status}</td>{_num(row.nuclei)}{_num(row.density)}"
            f"{_mix_cell(row)}{_num(row.shift_score)}{_num(row.seconds)}"
            f'<td data-v="{len(row.flags)}" class="warn">{flags}</td></tr>')  # fmt: skip


def build_batch_index(out_root: str | Path, results: Iterable[SlideResult] | None = None) -> str:
    """The index page of a batch output folder, as HTML text."""
    rows = _rows(Path(out_root), results)
    flag_outliers(rows)
    header = ["thumbnail", "slide", "status", "nuclei", "density (/mm²)", "class mix", "shift score", "time (s)",
              "flags"]  # fmt: skip
    head = "".join(f'<th class="sortable">{esc(h)}</th>' if i else f"<th>{esc(h)}</th>" for i, h in enumerate(header))
    n_ok = sum(r.status in ("ok", "skipped") for r in rows)
    n_failed = sum(r.status == "failed" for r in rows)
    n_flagged = sum(bool(r.flags) for r in rows)
    dens = [r.density for r in rows if r.density]
    summary = (f"<p>{len(rows)} slide(s): {n_ok} done, {n_failed} failed, "
               f"{len(rows) - n_ok - n_failed} incomplete; <b>{n_flagged}</b> flagged as outliers"
               f"{f'; median density {fmt(float(np.median(dens)))} nuclei/mm² of tissue' if dens else ''}. "
               "Click a column header to sort.</p>")  # fmt: skip
    note = (f'<p class="muted">Outliers: modified z-score (median/MAD) beyond {Z_LIMIT} of log10 density, or of '
            f"the class mix's distance to the batch median mix (needs at least {MIN_SLIDES} slides).</p>")
    body = (f"<h1>histoseg batch QC: {esc(Path(out_root).resolve().name)}</h1>{summary}"
            f'<table class="sortable" id="slides"><thead><tr>{head}</tr></thead><tbody>'
            + "".join(_html_row(r) for r in rows) + f"</tbody></table>{note}")  # fmt: skip
    return page("histoseg batch QC", body, histoseg.__version__, SORT_SCRIPT)


def write_batch_index(out_root: str | Path, results: Iterable[SlideResult] | None = None) -> Path:
    """Write ``OUT/index.html`` atomically and return its path."""
    target = Path(out_root) / INDEX_NAME
    text = build_batch_index(out_root, results)
    with atomic_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return target


def index_after_batch(out_root: str | Path, results: Sequence[SlideResult], report: bool = True) -> Path | None:
    """``segment_batch``'s hook: write the index unless reports are off or nothing was attempted.

    Like the slide reports, an index that cannot be built is logged, never a batch failure.
    """
    if not report or not results or not Path(out_root).is_dir():
        return None
    try:
        return write_batch_index(out_root, results)
    except Exception:  # noqa: BLE001 - the index is secondary to the outputs it lists
        log.exception("%s: the batch index could not be written (rebuild it with `histoseg report`)", out_root)
        return None
