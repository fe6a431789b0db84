"""An OpenVINO compiled network that hands its working buffers back when its process stops using it.

Why: OpenVINO keeps the buffers of its last inference (about 1 GB for a 1408² region of the default network,
fp32, measured on an AMD EPYC with AVX2) for as long as the compiled model lives, so that the next region
does not pay to fault them in again (~0.45 s a time). That is right while regions keep coming, but a worker
idles between slides and while the client stitches and exports, and then those buffers are only a second
copy of the peak: with two workers they held ~2.8 GB while the client exported a 20k² slide.

So each engine notes when it last ran; one daemon thread a process (started with the first engine, not at
import) releases the buffers of every engine idle for ``IDLE_RELEASE_S``. A region that comes after that
allocates them again, once. The outputs do not depend on it (the buffers are workspace, written before read;
tested bit for bit). A lock keeps a release from running beside an inference, and two inferences from running
on one compiled model at once (its implicit request is not meant for concurrent calls).
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

import numpy as np

IDLE_RELEASE_S = 3.0  # seconds without an inference before an engine's buffers go back
_POLL_S = 1.0

_WATCHED: weakref.WeakSet[OpenVinoEngine] = weakref.WeakSet()
_JANITOR: threading.Thread | None = None
_JANITOR_LOCK = threading.Lock()


class OpenVinoEngine:
    """Callable engine: normalised (1, 3, H, W) float32 in, the network's raw outputs by name out."""

    def __init__(self, compiled: Any, idle_release_s: float | None = None) -> None:
        self._compiled = compiled
        self._idle = IDLE_RELEASE_S if idle_release_s is None else idle_release_s
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._holding = False  # whether buffers from an inference may still be held
        self.releases = 0  # how many times the buffers went back (tests and benchmarks read it)
        self.names = [o.get_any_name() for o in compiled.outputs]
        _watch(self)

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        with self._lock:
            res = self._compiled([x])  # outputs are copied out of the request (share_outputs=False)
            self._holding = True
            self._last = time.monotonic()
            return {n: np.asarray(res[i]) for i, n in enumerate(self.names)}

    def release(self) -> bool:
        """Hand the working buffers back now (True when there were any); waits for a running inference."""
        with self._lock:
            return self._release()

    def release_if_idle(self, now: float) -> bool:
        """Release when no inference ran for ``idle_release_s``; never waits for one that is running."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            return now - self._last >= self._idle and self._release()
        finally:
            self._lock.release()

    def _release(self) -> bool:
        if not self._holding:
            return False
        self._compiled.release_memory()
        self._holding = False
        self.releases += 1
        return True


def _watch(engine: OpenVinoEngine) -> None:
    """Register ``engine`` with this process's janitor thread, starting the thread the first time."""
    global _JANITOR
    with _JANITOR_LOCK:
        _WATCHED.add(engine)
        if _JANITOR is None or not _JANITOR.is_alive():
            _JANITOR = threading.Thread(target=_janitor, name="histoseg-engine-janitor", daemon=True)
            _JANITOR.start()


def _janitor() -> None:
    while True:
        time.sleep(_POLL_S)
        now = time.monotonic()
        for engine in list(_WATCHED):
            engine.release_if_idle(now)
