"""Python's cyclic garbage collector paused while an export builds many small objects.

A band's export builds many small acyclic objects (the stitched table's ragged arrays, a polygon and a list of
values per nucleus; the GeoJSON writer once built a list per polygon vertex too) that count towards the
collector's thresholds and set off full collections, each of which walks every tracked object of the client
(the loaded network, Dask's state, the tables): with a list per vertex, 24 full collections, 4.2 s of client CPU
beside the workers on a 10000² slide (48,011 nuclei; 2-core AMD EPYC, AVX2 only). Reference counting frees
these objects as before; only the search for cycles waits until the block ends.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0  # blocks open now, in any thread (a pipelined batch writes two slides' bands at once)
_resume = False  # whether the collector was enabled when the first open block paused it


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector in the block; it resumes when the last open block ends, if it ran
    before the first began (a collector the caller disabled stays disabled)."""
    global _depth, _resume
    with _lock:
        if _depth == 0:
            _resume = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _resume:
                gc.enable()


__all__ = ["gc_paused"]
