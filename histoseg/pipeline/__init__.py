"""Slide and batch orchestration (layer 5).

The names below are imported on first use (PEP 562): a Dask worker unpickles ``pipeline.tasks.run_region``,
which imports this package, and must not import the orchestration (adaptation, hence torch) with it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from histoseg.pipeline.batch import discover, segment_batch
    from histoseg.pipeline.folder import output_name, slide_stem
    from histoseg.pipeline.slide import SlideReport, segment_slide

__all__ = ["SlideReport", "discover", "output_name", "segment_batch", "segment_slide", "slide_stem"]

_WHERE = {
    "discover": "batch",
    "segment_batch": "batch",
    "output_name": "folder",
    "slide_stem": "folder",
    "SlideReport": "slide",
    "segment_slide": "slide",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"histoseg.pipeline.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
