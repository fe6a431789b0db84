"""``histoseg report OUT``: rebuild the QC reports of existing outputs (no segmentation, no network).

``OUT`` is a batch output folder (every finished slide folder gets ``report.html``, then ``OUT/index.html``
is written) or one slide's folder (only its ``report.html``). Slides that did not finish (no ``_SUCCESS``)
get no report but are listed in the index as incomplete.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from histoseg.errors import OutputError

log = logging.getLogger("histoseg")


def add_report_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the ``report`` subcommand on the main parser's subparsers."""
    rp = sub.add_parser("report", help="rebuild QC reports (report.html per slide, index.html) from existing outputs")
    rp.add_argument("output", metavar="OUT", help="a segment output folder (or one slide's folder inside it)")
    rp.add_argument("--no-index", action="store_true", help="only the per-slide reports, not OUT/index.html")


def run_report(args: argparse.Namespace) -> int:
    from histoseg.report import write_batch_index, write_slide_report
    from histoseg.report.data import slide_folders

    out = Path(args.output)
    folders = slide_folders(out)  # OutputError when OUT is missing
    single = folders == [out]
    if not folders:
        raise OutputError(f"{out}: no slide output folders (with provenance.json) found")
    written = 0
    for folder in folders:
        if not (folder / "_SUCCESS").is_file():
            log.warning("%s: not finished (no _SUCCESS); no report", folder)
            continue
        path = write_slide_report(folder)
        written += 1
        print(path)
    if not single and not args.no_index:
        print(write_batch_index(out))
    log.info("%d report(s) written", written)
    return 0
