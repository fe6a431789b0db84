"""Slide input/output (layer 1): readers with one interface over several backends, and a pyramid writer.

``open_slide`` returns a :class:`SlideReader`; ``check_brightfield`` refuses non-H&E content;
``write_pyramidal_tiff`` writes Aperio-SVS-compatible tiled pyramids (test slides, exports).
"""

from histoseg.io.base import SlideReader
from histoseg.io.checks import check_brightfield
from histoseg.io.open import open_slide
from histoseg.io.writer import write_pyramidal_tiff

__all__ = ["SlideReader", "check_brightfield", "open_slide", "write_pyramidal_tiff"]
