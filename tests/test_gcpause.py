"""``export.gcpause.gc_paused``: the cyclic collector waits while a band's outputs are built, and comes back as
it was; a band's GeoJSON export sets off no full collection."""

from __future__ import annotations

import gc
import threading

import numpy as np
from shapely.geometry import Polygon, box

from histoseg.export.gcpause import gc_paused


def test_paused_in_the_block_and_restored_after_nested_blocks_and_errors() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer block is still open
    assert gc.isenabled()
    try:
        with gc_paused():
            raise KeyError("x")
    except KeyError:
        pass
    assert gc.isenabled()


def test_a_collector_the_caller_disabled_stays_disabled() -> None:
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_two_threads_resume_only_when_the_last_block_ends() -> None:
    first_in, second_done, states = threading.Event(), threading.Event(), []

    def slow() -> None:
        with gc_paused():
            first_in.set()
            second_done.wait(5)
            states.append(("slow, after the other ended", gc.isenabled()))

    t = threading.Thread(target=slow)
    t.start()
    first_in.wait(5)
    with gc_paused():
        pass
    states.append(("quick ended, slow still open", gc.isenabled()))
    second_done.set()
    t.join()
    assert states == [("quick ended, slow still open", False), ("slow, after the other ended", False)]
    assert gc.isenabled()


def _vertex_lists(polys: list[Polygon]) -> list[list[list[float]]]:
    """A band's outlines as a list per vertex, the way a band's objects used to be built for ``json.dumps``."""
    return [[list(xy) for xy in p.exterior.coords] for p in polys]


def test_building_a_bands_geometries_sets_off_no_full_collection() -> None:
    """20,000 nuclei of 40 vertices: ~800,000 lists. Unpaused they count towards the thresholds and set off full
    collections (counted with gc.callbacks); paused, none."""
    rng = np.random.default_rng(0)
    polys = [box(x, y, x + 5, y + 5).buffer(3, quad_segs=10) for x, y in rng.uniform(0, 1e4, (20000, 2))]
    full: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            full.append(1)

    keep = [[i] for i in range(200_000)]  # a client's heap: tracked objects a full collection walks
    gc.callbacks.append(count)
    try:
        gc.collect()
        full.clear()
        plain = _vertex_lists(polys)
        unpaused = len(full)
        full.clear()
        with gc_paused():
            paused = _vertex_lists(polys)
        assert len(full) == 0 and unpaused >= 1
    finally:
        gc.callbacks.remove(count)
    assert plain == paused and len(keep) == 200_000
