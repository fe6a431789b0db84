"""Small HTML building blocks and the page template (standard library ``string.Template``).

Pages are self-contained: styles and the sorting script are inline, images are ``data:`` URIs, nothing
is fetched from a network, so a report opens from a file share or an e-mail attachment. Every text that
comes from data (file names, class names, messages) goes through :func:`esc`.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from string import Template

__all__ = ["PAGE", "SORT_SCRIPT", "bars", "data_uri", "esc", "fmt", "img", "kv_table", "page", "section"]

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0 auto;
 max-width:1280px;padding:12px 24px;color:#222;background:#fafafa}
h1{font-size:1.5em;margin:.4em 0}h2{font-size:1.15em;border-bottom:1px solid #ccc;padding-bottom:3px;
 margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em;margin:.4em 0}td,th{border:1px solid #ddd;padding:3px 8px;
 text-align:left;vertical-align:top}th{background:#eee}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto}.fields{display:flex;flex-wrap:wrap;gap:14px}
.field{background:#fff;border:1px solid #ddd;padding:6px}.field img{width:256px;height:256px;
 image-rendering:auto}.pair{display:flex;gap:4px}.muted{color:#777}.warn{color:#a35200}
.bad{color:#b00020;font-weight:bold}.ok{color:#1b7a1b}tr.outlier td{background:#fff1e6}
#slides img{max-height:110px;max-width:160px}
th.sortable{cursor:pointer;user-select:none;white-space:nowrap}th.sortable:after{content:" \\2195";color:#999}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;border:1px solid #555;
 vertical-align:middle}nav a{margin-right:12px}
.bars{display:grid;grid-template-columns:max-content 480px max-content;gap:3px 8px;align-items:center;
 font-size:.9em;margin:.5em 0}.bars .bar{height:14px;border:1px solid #555;min-width:1px}
"""

# Click a header to sort by that column (numbers by data-v when present); click again to reverse.
SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (t) {
  t.querySelectorAll("th.sortable").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var body = t.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute("data-order") !== "asc";
      t.querySelectorAll("th.sortable").forEach(function (o) { o.removeAttribute("data-order"); });
      th.setAttribute("data-order", asc ? "asc" : "desc");
      function key(r) {
        var c = r.cells[th.cellIndex], v = c.getAttribute("data-v");
        if (v !== null && v !== "" && !isNaN(Number(v))) { return Number(v); }
        return c.textContent.trim().toLowerCase();
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (typeof x !== typeof y) { x = String(x); y = String(y); }
        return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""

PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="histoseg $version">
<title>$title</title>
<style>$style</style>
</head>
<body>
$body
<script>$script</script>
</body>
</html>
""")


def esc(value: object) -> str:
    """HTML-escaped text of ``value``."""
    return html.escape(str(value), quote=True)


def fmt(value: object, digits: int = 3) -> str:
    """Short human text of a number (or the value itself); escaped."""
    if isinstance(value, bool) or value is None:
        return esc("—" if value is None else value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return esc(value)
        return f"{value:,.0f}" if abs(value) >= 10 ** digits else f"{value:.{digits}g}"
    return esc(value)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def img(data: bytes | None, mime: str, alt: str, **attrs: str) -> str:
    """An ``<img>`` with embedded bytes (or a muted note when there is no picture).

    Attribute names: a trailing ``_`` is dropped (``class_``), other ``_`` become ``-`` (``data_box``).
    """
    if not data:
        return f'<p class="muted">{esc(alt)}: not available</p>'
    extra = "".join(f' {k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in attrs.items())
    return f'<img src="{data_uri(data, mime)}" alt="{esc(alt)}"{extra}>'


def kv_table(rows: Iterable[tuple[str, str]]) -> str:
    """Two-column table; values are already HTML (use :func:`fmt`/:func:`esc`)."""
    body = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def bars(items: Sequence[tuple[str, float, tuple[int, int, int], str]]) -> str:
    """A horizontal bar chart in plain HTML/CSS: (label, value, RGB, value text) per bar, longest = full width.

    Bars of a few values need no plotting library, stay sharp at any zoom and cost nothing to build.
    """
    top = max((v for _, v, _, _ in items if math.isfinite(v)), default=0.0) or 1.0
    rows = []
    for label, value, (r, g, b), text in items:
        pct = 100.0 * max(0.0, value) / top if math.isfinite(value) else 0.0
        rows.append(f'<div>{esc(label)}</div><div><div class="bar" style="width:{pct:.2f}%;'
                    f'background:rgb({r},{g},{b})"></div></div><div class="num">{esc(text)}</div>')  # fmt: skip
    return f'<div class="bars">{"".join(rows)}</div>'


def section(ident: str, title: str, body: str) -> str:
    return f'<section id="{esc(ident)}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def page(title: str, body: str, version: str, script: str = "") -> str:
    return PAGE.substitute(title=esc(title), style=STYLE, body=body, script=script, version=esc(version))
