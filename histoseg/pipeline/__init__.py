"""Pipeline (layer 5): one slide, or a batch of slides, end to end."""

from histoseg.pipeline.batch import discover, segment_batch
from histoseg.pipeline.folder import output_name, slide_stem
from histoseg.pipeline.slide import SlideReport, segment_slide

__all__ = ["SlideReport", "discover", "output_name", "segment_batch", "segment_slide", "slide_stem"]
