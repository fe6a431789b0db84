"""The exception hierarchy: every error a user can cause is one of these, never an ``assert``.

The CLI prints ``str(error)`` on one line and exits non-zero; a batch records it and carries on.
"""

from __future__ import annotations


class HistosegError(Exception):
    """Base class of every error histoseg raises on purpose."""


class SlideError(HistosegError):
    """A slide cannot be used as given."""


class SlideNotFoundError(SlideError, FileNotFoundError):
    """The slide path does not exist."""


class UnsupportedFormatError(SlideError):
    """No backend can open this file type (or it is not an image at all)."""


class CorruptSlideError(SlideError):
    """The file claims a supported format but cannot be decoded (truncated, damaged)."""


class ImplausibleSlideError(SlideError):
    """The file declares far more pixels than its bytes can hold (a decompression bomb or a damaged header).

    Not a CorruptSlideError on purpose: no other backend is tried, the file is refused at once.
    """


class MissingMppError(SlideError):
    """The slide has no physical pixel size; the user must pass ``--slide-mpp``."""


class UnsupportedImageError(SlideError):
    """The slide opens but its content is not supported (e.g. fluorescence instead of brightfield H&E)."""


class SlideTooSmallError(SlideError):
    """The slide is smaller than the network's smallest input at processing resolution."""


class NoTissueError(SlideError):
    """The tissue mask found no tissue: nothing to segment."""


class ModelError(HistosegError):
    """A model name or artifact cannot be resolved or loaded."""


class OutputError(HistosegError):
    """The output location cannot be written."""


class ConfigError(HistosegError):
    """Invalid settings (bad option value, unknown format, inconsistent combination)."""


class HaloTooSmallError(HistosegError):
    """An owned instance touches the outer edge of its region's halo (raised in strict mode)."""


class DatasetError(HistosegError):
    """A training or evaluation dataset is missing or malformed."""
