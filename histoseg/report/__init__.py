"""QC reports (layer 5): ``OUT/<stem>/report.html`` per slide and ``OUT/index.html`` per batch.

Both are built from the files a run leaves on disk (and the slides), so they can be rebuilt at any time
with ``histoseg report OUT``. Matplotlib is imported only when a report is built.
"""

from histoseg.report.batch_index import INDEX_NAME, build_batch_index, index_after_batch, write_batch_index
from histoseg.report.slide_report import REPORT_NAME, build_slide_report, report_after_slide, write_slide_report

__all__ = [
    "INDEX_NAME",
    "REPORT_NAME",
    "build_batch_index",
    "build_slide_report",
    "index_after_batch",
    "report_after_slide",
    "write_batch_index",
    "write_slide_report",
]
