"""The cheaper region steps give exactly what the steps they replace gave: hole filling by labelling the
background, centroids from the labelled pixels only; and the allocator setting that keeps freed buffers."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from histoseg.distributed.runner import KEEP_MEMORY_ENV
from histoseg.postprocess import instance_centroids
from histoseg.postprocess.watershed import _relabel_sequential, fill_holes


def test_fill_holes_known_cases() -> None:
    ring = np.zeros((7, 7), bool)
    ring[1:6, 1:6] = True
    ring[2:5, 2:5] = False  # a 3x3 hole
    ring[3, 3] = True  # an island inside the hole stays; the hole around it is filled
    filled = fill_holes(ring)
    assert filled[1:6, 1:6].all() and filled.sum() == 25
    open_c = ring.copy()
    open_c[3, 1] = False  # the hole now reaches the outside through a 4-connected gap: nothing is filled
    open_c[3, 0] = False
    assert np.array_equal(fill_holes(open_c), open_c)
    diag = np.zeros((5, 5), bool)
    diag[1:4, 1:4] = True
    diag[2, 2] = False
    diag[1, 1] = False  # the hole touches the outside only at a corner: 4-connectivity calls it a hole
    assert fill_holes(diag)[2, 2]
    assert not fill_holes(np.zeros((4, 4), bool)).any() and fill_holes(np.ones((3, 3), bool)).all()


@pytest.mark.parametrize("seed", range(6))
def test_fill_holes_equals_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = ndi.binary_opening(rng.random((97, 131)) < 0.55 + 0.05 * seed)  # many holes, some at the border
    assert np.array_equal(fill_holes(m), ndi.binary_fill_holes(m))


def _centroids_by_sums(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The previous formula: per-label sums over every pixel of float64 index images."""
    idx = np.arange(1, int(labels.max()) + 1)
    counts = ndi.sum_labels(np.ones_like(labels, dtype=np.float64), labels, idx)
    present = counts > 0
    ys, xs = np.indices(labels.shape, dtype=np.float64)
    cy = ndi.sum_labels(ys, labels, idx)[present] / counts[present] + 0.5
    cx = ndi.sum_labels(xs, labels, idx)[present] / counts[present] + 0.5
    return idx[present], np.stack([cy, cx], axis=1)


def test_centroids_bit_identical_and_known() -> None:
    lab = np.zeros((6, 8), np.int32)
    lab[1:3, 1:4] = 2  # id 1 absent: skipped
    lab[4, 7] = 3
    ids, cyx, slices = instance_centroids(lab)
    assert ids.tolist() == [2, 3] and cyx.tolist() == [[2.0, 2.5], [4.5, 7.5]]
    assert slices[0] is None and slices[1] == (slice(1, 3), slice(1, 4))
    rng = np.random.default_rng(0)
    big, _ = ndi.label(rng.random((400, 333)) < 0.4)
    big[big % 7 == 0] = 0  # gaps in the ids
    ids, cyx, _ = instance_centroids(big)
    ref_ids, ref = _centroids_by_sums(big)
    assert np.array_equal(ids, ref_ids) and cyx.tobytes() == ref.tobytes()
    assert instance_centroids(np.zeros((3, 3), np.int32))[0].size == 0


def test_relabel_sequential_keeps_order() -> None:
    lab = np.array([[0, 7, 7], [3, 0, 9]], np.int32)
    assert _relabel_sequential(lab).tolist() == [[0, 2, 2], [1, 0, 3]]


_ALLOCATOR = """
import json, resource, sys
import numpy as np
import psutil
from histoseg.distributed.runner import InProcessRunner
proc = psutil.Process()
runner = InProcessRunner()  # applies the thresholds (unless HISTOSEG_KEEP_MEMORY=0)
if sys.argv[1] == "closed":
    runner.close()  # puts glibc's default thresholds back
def rounds(nbytes):  # a region's array: allocated, written and freed again and again
    a = np.ones(nbytes, np.uint8)
    del a
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        a = np.ones(nbytes, np.uint8)
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
small = rounds(6 << 20)
rss0 = proc.memory_info().rss
big = np.ones(64 << 20, np.uint8)
del big
print(json.dumps({"small": small, "big_left_mb": (proc.memory_info().rss - rss0) / 2**20}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator setting is glibc's")
def test_in_process_thresholds_keep_small_blocks_return_large_ones_and_close_restores() -> None:
    """With the in-process runner's thresholds (8 MiB): a 6 MiB array allocated and freed five times is served
    from the same heap pages (no new faults); a 64 MiB one goes back to the kernel at once (the earlier setting,
    mmap off, kept it resident until the next hand-back: that was the runner's peak). close() puts glibc's
    128 KiB threshold back: the 6 MiB array is mapped afresh each round again (at least one fault per 2 MiB
    huge page)."""
    import json
    import os
    import subprocess
    import sys

    def run(mode: str) -> dict[str, float]:
        # without tunables: a Dask cluster of this process still open (another test's) puts its workers' in os.environ
        env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", KEEP_MEMORY_ENV)}
        out = subprocess.run([sys.executable, "-c", _ALLOCATOR, mode], env=env, capture_output=True, text=True,
                             check=True)
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))

    kept, closed = run("open"), run("closed")
    assert kept["small"] < 5 and kept["big_left_mb"] < 8
    assert closed["small"] >= 5 * 3


def test_worker_tunables_respect_the_users_own_and_the_off_switch() -> None:
    from histoseg.distributed.runner import WORKER_TUNABLES, worker_tunables

    ours = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=8388608:glibc.malloc.trim_threshold=8388608"
    assert worker_tunables({}) == ours == ":".join(f"{k}={v}" for k, v in WORKER_TUNABLES.items())
    own = "glibc.malloc.arena_max=2"
    assert worker_tunables({"GLIBC_TUNABLES": own}) == f"{own}:{ours}"
    # each of the user's own stands, the others are added
    assert worker_tunables({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == (
        "glibc.malloc.hugetlb=0:glibc.malloc.mmap_threshold=8388608:glibc.malloc.trim_threshold=8388608"
    )
    mine = "glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=131072:glibc.malloc.hugetlb=0"
    assert worker_tunables({"GLIBC_TUNABLES": mine}) == mine
    assert worker_tunables({"GLIBC_TUNABLES": ours}) == ours  # a cluster of this process still open: unchanged
    assert worker_tunables({KEEP_MEMORY_ENV: "0"}) is None  # the allocator at its defaults


def test_worker_env_adds_one_thread_and_the_kernel_cache_unless_the_user_set_it() -> None:
    from histoseg.distributed.runner import SINGLE_THREAD_ENV, WORKER_ENV, worker_env

    assert WORKER_ENV == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "512"}
    assert worker_env({}) == {**SINGLE_THREAD_ENV, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "512"}
    # the user's own value stands (the worker inherits it), and the off switch leaves oneDNN at its default
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in worker_env({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"})
    assert worker_env({KEEP_MEMORY_ENV: "0"}) == SINGLE_THREAD_ENV


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "never"
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else "never"


_MAPS = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 64 << 20
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):  # a worker's engine buffers, allocated afresh at each change of input shape (plain malloc:
    p = libc.malloc(n)  # numpy asks for huge pages for its own arrays, OpenVINO does not)
    ctypes.memset(p, 1, n)
    libc.free(p)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or tuple(int(v) for v in platform.libc_ver()[1].split(".")[:2]) < (2, 35)
    or _thp_mode() == "never",
    reason="needs glibc 2.35+ (the hugetlb tunable) and transparent huge pages",
)
def test_workers_tunable_maps_large_buffers_with_huge_pages() -> None:
    """Five 64 MiB allocate/free rounds in a process started with the workers' tunable: 2 MiB pages, so at most
    ~32 faults a round instead of 16k (with THP ``always`` both are low; the tunable must never be worse)."""
    import os
    import subprocess
    import sys

    from histoseg.distributed.runner import worker_tunables

    def faults(tunables: str | None) -> int:
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        if tunables:
            env["GLIBC_TUNABLES"] = tunables
        out = subprocess.run([sys.executable, "-c", _MAPS], env=env, capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    tunable = worker_tunables({})
    assert tunable is not None
    with_huge, plain = faults(tunable), faults(None)
    assert with_huge < 5 * 16384 // 10
    if _thp_mode() == "madvise":  # only the tunable asks for huge pages
        assert plain >= 5 * 16384 // 2 > with_huge


@pytest.mark.parametrize("seed", range(4))
def test_outline_first_gives_the_solid_mask_and_ring_of_the_two_step_path(seed: int) -> None:
    """Trying the outline on the raw mask before making it solid changes nothing: on random blobs with holes,
    corner-only contacts and several components the pixels and the ring are those of solid_mask + outline."""
    from histoseg.postprocess.instances import _solid_outline, pixel_outline, solid_mask

    rng = np.random.default_rng(seed)
    fast_paths = 0
    for _ in range(300):
        h, w = rng.integers(1, 14, 2)
        m = rng.random((h, w)) < rng.uniform(0.3, 0.95)
        if rng.random() < 0.5:
            m = ndi.binary_closing(m) | m
        if not m.any():
            continue
        ref = solid_mask(m)
        got_mask, got_ring = _solid_outline(m)
        assert np.array_equal(got_mask, ref)
        assert np.array_equal(got_ring, pixel_outline(ref))
        fast_paths += bool(np.array_equal(ref, m))
    # the hand-built cases: a ring (hole), two pixels touching at a corner, a solid L
    ring = np.ones((3, 3), bool)
    ring[1, 1] = False
    diag = np.eye(2, dtype=bool)
    ell = np.array([[1, 0], [1, 1]], bool)
    for m in (ring, diag, ell):
        got_mask, got_ring = _solid_outline(m)
        assert np.array_equal(got_mask, solid_mask(m)) and np.array_equal(got_ring, pixel_outline(solid_mask(m)))
    assert _solid_outline(ring)[0].all() and _solid_outline(diag)[0].sum() == 1
    assert fast_paths > 20  # the random set does exercise the outline-first path
