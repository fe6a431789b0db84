"""histoseg: whole-slide nuclei segmentation with exact stitching.

Importing the package has no side effects: no logging set-up, no downloads, no torch import.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
