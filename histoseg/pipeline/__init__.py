"""Pipeline (layer 5): one slide, or a batch of slides, end to end."""

from histoseg.pipeline.batch import discover, segment_batch
from histoseg.pipeline.slide import SlideReport, segment_slide, slide_stem

__all__ = ["SlideReport", "discover", "segment_batch", "segment_slide", "slide_stem"]
