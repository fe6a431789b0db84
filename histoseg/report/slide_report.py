"""``OUT/<stem>/report.html``: the QC report of one segmented slide.

Built only from the slide's output folder (``provenance.json``, ``tissue_mask.png``, the Parquet nucleus
table) and the slide itself (thumbnail and field pixels), so ``histoseg report OUT`` rebuilds exactly what
``segment`` wrote. Sections: overview, thumbnail (tissue outline, processed regions, fields), fields (raw
beside the class-coloured overlay), density heatmap, class composition, distributions, adaptation, timings,
warnings. Written atomically; ``segment_slide`` calls :func:`report_after_slide` before ``_SUCCESS``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

import histoseg
from histoseg.atomic import atomic_file
from histoseg.config import SegmentConfig
from histoseg.errors import HistosegError
from histoseg.io import open_slide
from histoseg.io.base import SlideReader
from histoseg.report import figures as fg
from histoseg.report.data import SlideOutputs, load_slide_outputs
from histoseg.report.fields import FIELD_PX, Field, choose_fields, render_fields
from histoseg.report.html import bars, esc, fmt, img, kv_table, page, section
from histoseg.tiling import plan_regions, tissue_cells
from histoseg.types import Box

__all__ = ["REPORT_NAME", "SECTIONS", "build_slide_report", "report_after_slide", "write_slide_report"]

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
THUMB_PX = 1024
SECTIONS = ("overview", "thumbnail", "fields", "density", "composition", "distributions", "adaptation", "timings",
            "warnings")  # fmt: skip
LOW_TISSUE_FRACTION = 0.02  # of the slide's area: below this the mask probably missed tissue


def write_slide_report(folder: str | Path) -> Path:
    """Build the report of one slide output folder and write it atomically; return its path."""
    folder = Path(folder)
    t0 = time.perf_counter()
    text = build_slide_report(folder)
    target = folder / REPORT_NAME
    with atomic_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    log.info("%s: QC report written in %.2f s", folder.name, time.perf_counter() - t0)
    return target


def report_after_slide(out_dir: str | Path, config: SegmentConfig) -> Path | None:
    """The pipeline's hook: write the report unless ``config.report`` is off.

    A report that cannot be built is logged and skipped: the segmentation outputs are complete and
    ``histoseg report OUT`` can build it later, so a plotting problem never fails a slide.
    """
    if not config.report:
        return None
    try:
        return write_slide_report(out_dir)
    except Exception:  # noqa: BLE001 - the report is secondary to the outputs it describes
        log.exception("%s: the QC report could not be written (rebuild it with `histoseg report`)", out_dir)
        return None


def _open_reader(outputs: SlideOutputs, warnings: list[str]) -> SlideReader | None:
    path = outputs.slide_path
    cfg = outputs.provenance.get("config", {})
    if not path:
        warnings.append("provenance.json names no slide: thumbnail from the tissue mask, fields without pixels")
        return None
    try:
        return open_slide(path, backend=cfg.get("backend", "auto"), mpp=cfg.get("slide_mpp"))
    except HistosegError as exc:
        warnings.append(f"slide not readable now ({exc}): thumbnail from the tissue mask, fields without pixels")
        return None


def _regions(outputs: SlideOutputs) -> list[Box]:
    """Processed region cores in level-0 px, planned again from the stored tissue mask and settings."""
    proc, cfg = outputs.provenance.get("processing", {}), outputs.provenance.get("config", {})
    shape = proc.get("plane_shape")
    if not shape or outputs.tissue is None:
        return []
    plane = (int(shape[0]), int(shape[1]))
    cells = tissue_cells(outputs.tissue, plane, float(cfg.get("min_tissue_fraction", 0.0)))
    size = int(proc.get("region_size", cfg.get("region_size", 1024)))
    try:
        regions = plan_regions(plane, size, int(proc.get("halo", 0)), cells)
    except HistosegError:
        return []  # settings this version cannot plan with: no region outlines
    s = outputs.scale
    return [Box(int(r.core.x * s), int(r.core.y * s), int(r.core.w * s), int(r.core.h * s)) for r in regions]


def _thumbnail(outputs: SlideOutputs, reader: SlideReader | None) -> tuple[np.ndarray, float]:
    if reader is not None:
        return reader.thumbnail(THUMB_PX)
    w, _ = outputs.dimensions
    mask = outputs.tissue if outputs.tissue is not None else np.zeros((64, 64), bool)
    grey = np.where(mask, 200, 245).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2), (w / mask.shape[1] if w else 1.0)


def _overview(outputs: SlideOutputs) -> str:
    p = outputs.provenance
    slide, model, proc = p.get("slide", {}), p.get("model", {}), p.get("processing", {})
    w, h = outputs.dimensions
    area, dens = outputs.tissue_area_mm2(), outputs.density_per_mm2()
    n = len(outputs.nuclei) if outputs.nuclei is not None else p.get("nuclei")
    rows = [
        ("slide", esc(slide.get("path", "?"))),
        ("scanner / reader", esc(f"{slide.get('vendor', '?')} / {slide.get('backend', '?')}")),
        ("size (level 0)", esc(f"{w} x {h} px, {slide.get('levels', '?')} level(s)")),
        ("pixel size", esc(f"{fmt(outputs.mpp0, 4)} µm/px ({slide.get('mpp_source', '?')})")),
        ("model", esc(f"{model.get('name', '?')} at {model.get('mpp', '?')} µm/px, sha256 "
                      f"{str(model.get('sha256') or '?')[:12]}")),
        ("nuclei", fmt(n)),
        ("tissue area", f"{fmt(area)} mm²" if area is not None else "—"),
        ("nuclei density", f"{fmt(dens)} / mm² of tissue" if dens is not None else "—"),
        ("regions", esc(f"{proc.get('regions', '?')} ({proc.get('regions_reused', 0)} reused), "
                        f"{proc.get('region_size', '?')} px + halo {proc.get('halo', '?')} px")),
        ("adaptation", esc(p.get("adaptation", {}).get("method", "none"))),
        ("histoseg", esc(p.get("histoseg_version", "?"))),
    ]  # fmt: skip
    return kv_table(rows)


def _legend(outputs: SlideOutputs) -> str:
    if outputs.nuclei is None:
        return ""
    parts = []
    for cid in sorted(set(np.unique(outputs.nuclei.class_ids).tolist())):
        r, g, b = outputs.nuclei.color_of(cid)
        name = outputs.nuclei.class_names.get(cid, f"class {cid}")
        parts.append(f'<span style="background:rgb({r},{g},{b})"></span>{esc(name)}')
    return f'<p class="legend">classes:{"".join(parts)}</p>'


def _fields_html(outputs: SlideOutputs, fields: list[Field]) -> str:
    if not fields:
        return '<p class="muted">no fields: no nucleus table, or the slide is smaller than one field</p>'
    mpp = outputs.provenance.get("processing", {}).get("mpp", 0.5)
    cards = []
    for i, f in enumerate(fields, 1):
        x, y, w, h = f.level0_box
        box = f"{x:.0f} {y:.0f} {w:.0f} {h:.0f}"
        raw = img(fg.encode_jpeg(f.raw) if f.raw is not None else None, "image/jpeg", f"field {i} raw",
                  class_="raw", data_box=box)  # fmt: skip
        over = img(fg.encode_png(f.overlay) if f.overlay is not None else None, "image/png", f"field {i} overlay",
                   class_="overlay", data_box=box)  # fmt: skip
        cards.append(
            f'<div class="field" data-label="{esc(f.label)}"><div><b>{i}. {esc(f.label)}</b> — {f.nuclei} nuclei, '
            f'level-0 x {x:.0f}, y {y:.0f} ({FIELD_PX * mpp:.0f} µm)</div><div class="pair">{raw}{over}</div></div>'
        )
    return _legend(outputs) + f'<div class="fields">{"".join(cards)}</div>'


def _adaptation_html(adapt: dict[str, Any]) -> str:
    method = adapt.get("method", "none")
    if method == "none":
        return f'<p class="muted">no adaptation (requested: {esc(adapt.get("requested", "none"))})</p>'
    kept = bool(adapt.get("kept_source"))
    guard = f"kept the source weights: {adapt.get('guard') or ''}" if kept else "adapted weights used"
    shift, gate = adapt.get("shift_score"), adapt.get("gate")
    census = adapt.get("census") or {}
    gate_txt = "—"
    if isinstance(shift, (int, float)) and isinstance(gate, (int, float)):
        gate_txt = "adapt (shift above the gate)" if shift > gate else "skip (shift within the gate)"
    rows = [
        ("method", esc(f"{method} (loss {adapt.get('loss', '?')}, params {adapt.get('params', '?')})")),
        ("shift score", f"{fmt(shift)} (gate {fmt(gate)})"),
        ("gate decision", esc(gate_txt)),
        ("loss", f"{fmt(adapt.get('loss_before'))} → {fmt(adapt.get('loss_after'))} (best step "
                 f"{fmt(adapt.get('best_step'))})"),
        ("guard", f'<span class="{"warn" if kept else "ok"}">{esc(guard)}</span>'),
        ("mirror-view agreement", f"{fmt(census.get('view_agreement_before'))} → "
                                  f"{fmt(census.get('view_agreement_after'))}"),
        ("seconds", fmt(adapt.get("seconds_total"))),
    ]  # fmt: skip
    curve = fg.loss_figure(adapt.get("loss_history") or [], adapt.get("best_step"))
    return kv_table(rows) + img(curve, "image/png", "adaptation loss curve")


def _timings_html(outputs: SlideOutputs) -> str:
    timings = {k: v for k, v in outputs.provenance.get("timings_s", {}).items() if isinstance(v, (int, float))}
    adapt_s = outputs.provenance.get("adaptation", {}).get("seconds_total")
    if isinstance(adapt_s, (int, float)):
        timings = {"adaptation": float(adapt_s), **timings}
    total = timings.pop("total", None)
    note = ("<p class=\"muted\">read, network and postprocess are summed over regions (worker seconds); "
            "regions_wall is the wall time of the region stage; stitch and export, written band by band beside "
            "it, are the client's seconds.</p>")  # fmt: skip
    head = f"<p>total {fmt(total)} s</p>" if total is not None else ""
    chart = bars([(k, float(v), (91, 132, 196), f"{v:.2f} s") for k, v in timings.items()])
    return head + chart + note


def _warnings(outputs: SlideOutputs, extra: list[str]) -> list[str]:
    p = outputs.provenance
    out = list(outputs.problems) + extra
    edge = p.get("processing", {}).get("halo_edge_nuclei", 0)
    if edge:
        out.append(f"{edge} nuclei touch a region's halo edge: the halo may be too small for them")
    for group in ("export", "processing"):
        for key, value in (p.get(group) or {}).items():
            if ("repair" in key or "bbox_fallback" in key) and isinstance(value, (int, float)) and value > 0:
                out.append(f"{value} polygon(s) {key.replace('_', ' ')} on export")
    frac = outputs.tissue_fraction()
    if frac is not None and frac < LOW_TISSUE_FRACTION:
        out.append(f"low tissue: the mask covers {100 * frac:.2f} % of the slide (tissue may have been missed)")
    if p.get("slide", {}).get("mpp_source") == "user":
        out.append("pixel size given with --slide-mpp, not read from the slide")
    adapt = p.get("adaptation", {})
    if adapt.get("kept_source") and "no shift" not in str(adapt.get("guard", "")):
        out.append(f"adaptation guard kept the source weights: {adapt.get('guard')}")
    if outputs.nuclei is not None and len(outputs.nuclei) == 0:
        out.append("no nuclei found")
    return out


def build_slide_report(folder: str | Path) -> str:
    """The report page of one slide output folder, as HTML text (deterministic for given files)."""
    outputs = load_slide_outputs(Path(folder))
    notes: list[str] = []
    reader = _open_reader(outputs, notes)
    try:
        thumb, factor = _thumbnail(outputs, reader)
        fields = choose_fields(outputs)
        render_fields(outputs, fields, reader)
    finally:
        if reader is not None:
            reader.close()
    regions = _regions(outputs)
    thumb_img = fg.thumbnail_overlay(thumb, outputs.tissue, factor, regions, [(f.label, f.level0_box) for f in fields])
    body = [f"<h1>{esc(outputs.stem)}: nuclei segmentation QC</h1>",
            "<nav>" + "".join(f'<a href="#{s}">{s}</a>' for s in SECTIONS) + "</nav>",
            section("overview", "Overview", _overview(outputs))]  # fmt: skip
    legend = ('<p class="legend">outline: <span style="background:rgb(0,170,0)"></span>tissue mask'
              '<span style="background:rgb(40,90,220)"></span>processed regions'
              '<span style="background:rgb(240,160,0)"></span>fields below</p>')  # fmt: skip
    body.append(section("thumbnail", "Slide", legend + img(fg.encode_jpeg(thumb_img), "image/jpeg", "thumbnail",
                                                           id="thumb")))
    body.append(section("fields", "Representative fields (raw | nuclei by class)", _fields_html(outputs, fields)))
    grid = fg.density_grid(outputs)
    dens = fg.density_figure(grid[0], grid[1], outputs.mpp0 or 1.0) if grid is not None else None
    body.append(section("density", "Nuclei density", img(dens, "image/png", "density heatmap")))
    comp = ""
    if outputs.nuclei is not None:
        nuc = outputs.nuclei
        ids, counts = np.unique(nuc.class_ids, return_counts=True)
        total = max(1, int(counts.sum()))
        comp = bars([(nuc.class_names.get(int(c), f"class {int(c)}"), float(n), nuc.color_of(int(c)),
                      f"{int(n):,} ({100 * n / total:.1f} %)") for c, n in zip(ids, counts, strict=True)])  # fmt: skip
    body.append(section("composition", "Class composition", comp or '<p class="muted">no nucleus table</p>'))
    dist = fg.distributions_figure(outputs.nuclei) if outputs.nuclei is not None else None
    body.append(section("distributions", "Distributions (area, eccentricity, hematoxylin)",
                        img(dist, "image/png", "distributions")))  # fmt: skip
    body.append(section("adaptation", "Adaptation", _adaptation_html(outputs.provenance.get("adaptation", {}))))
    body.append(section("timings", "Timings", _timings_html(outputs)))
    warns = _warnings(outputs, notes)
    warn_html = ("<ul>" + "".join(f'<li class="warn">{esc(w)}</li>' for w in warns) + "</ul>") if warns else (
        '<p class="ok">none</p>')  # fmt: skip
    body.append(section("warnings", f"Warnings ({len(warns)})", warn_html))
    return page(f"{outputs.stem} — histoseg QC", "\n".join(body), histoseg.__version__)
