"""Tests of ``histoseg.distributed.runner``: every result comes back with its submission index,
whatever order the tasks finish in, and a local Dask cluster leaves no worker process behind.

The task function lives at the top of this module: Dask workers are spawned processes and import it
as ``tests.test_runner`` (the parent's ``sys.path`` travels with the spawn).
"""

from __future__ import annotations

import operator
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import cv2
import psutil
import pytest
import torch

from histoseg.distributed import DaskRunner, InProcessRunner, local_dask_runner, make_runner
from histoseg.errors import ConfigError

N_ITEMS = 6
UNIT_S = 0.3  # item i sleeps UNIT_S * (N_ITEMS - 1 - i): the first submitted finish last


def slow_affine(item: int, factor: int, unit_s: float) -> int:
    """``item * factor + 1000`` after a sleep that shrinks as ``item`` grows."""
    time.sleep(unit_s * (N_ITEMS - 1 - item))
    return item * factor + 1000


def _expected(factor: int) -> dict[int, int]:
    return {i: i * factor + 1000 for i in range(N_ITEMS)}


@pytest.fixture
def restore_threads() -> Iterator[None]:
    """Runners set torch/OpenCV thread counts of the calling process; put them back afterwards."""
    torch_threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    yield
    torch.set_num_threads(torch_threads)
    cv2.setNumThreads(cv2_threads)


def _new_children(before: set[int]) -> list[psutil.Process]:
    """Live child processes started since ``before``, less multiprocessing's resource tracker (one per
    interpreter, started by the first spawn and kept for the life of the interpreter)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.pid in before or p.status() == psutil.STATUS_ZOMBIE:
                continue
            if any("resource_tracker" in part for part in p.cmdline()):
                continue
        except psutil.NoSuchProcess:
            continue
        out.append(p)
    return out


# ---------------------------------------------------------------------------------------------------
# in-process


def test_in_process_runner_returns_every_result_with_its_index(restore_threads: None) -> None:
    runner = InProcessRunner()
    assert runner.n_workers == 1
    got = list(runner.imap_unordered(slow_affine, list(range(N_ITEMS)), 7, 0.0))
    assert got == sorted(_expected(7).items())  # in-process: one after another, in submission order
    assert list(runner.imap_unordered(slow_affine, [], 7, 0.0)) == []
    # positional args after the items reach the function unchanged
    assert list(runner.imap_unordered(operator.mul, [2, 3], 5)) == [(0, 10), (1, 15)]
    runner.close()


@pytest.mark.parametrize("workers", [1, 0])
def test_make_runner_one_worker_is_in_process(
    workers: int, restore_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HISTOSEG_THREADS", "1")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    runner = make_runner(workers)
    try:
        assert isinstance(runner, InProcessRunner)
        assert runner.n_workers == 1
        assert torch.get_num_threads() == 1  # HISTOSEG_THREADS is applied
        assert _new_children(before) == []  # no process started
    finally:
        runner.close()


def test_local_dask_runner_rejects_zero_workers() -> None:
    with pytest.raises(ConfigError):
        local_dask_runner(0)


# ---------------------------------------------------------------------------------------------------
# Dask


def test_dask_runner_results_by_index_and_clean_close(restore_threads: None) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    runner = make_runner(2)
    try:
        assert isinstance(runner, DaskRunner)
        assert runner.n_workers == 2
        # design section 8: worker processes with one thread each and single-threaded math libraries
        assert sorted(runner.client.nthreads().values()) == [1, 1]
        assert set(runner.client.run(os.getenv, "OMP_NUM_THREADS").values()) == {"1"}
        assert set(runner.client.run(torch.get_num_threads).values()) == {1}
        workers = _new_children(before)
        assert len(workers) == 2, [p.cmdline() for p in workers]

        order: list[int] = []
        results: dict[int, int] = {}
        for i, res in runner.imap_unordered(slow_affine, list(range(N_ITEMS)), 7, UNIT_S):
            order.append(i)
            results[i] = res
        assert sorted(order) == list(range(N_ITEMS))  # every index exactly once
        assert results == _expected(7)
        # the same results as in-process, although the tasks finished in another order: item 0 sleeps
        # longest, so with two workers some other task finishes first
        assert results == dict(InProcessRunner().imap_unordered(slow_affine, list(range(N_ITEMS)), 7, 0.0))
        assert order[0] != 0, order

        # a result leaves its worker as soon as the caller has it, not when the map ends (flat in slide size)
        gen = runner.imap_unordered(slow_affine, list(range(N_ITEMS)), 7, 0.0)
        assert dict(next(gen) for _ in range(N_ITEMS)) == _expected(7)  # all taken; the map has not ended
        held = [k for k in runner.client.who_has() if "slow_affine" in str(k)]
        for _ in range(100):  # releases reach the scheduler in batches, a few ms apart
            if not held:
                break
            time.sleep(0.05)
            held = [k for k in runner.client.who_has() if "slow_affine" in str(k)]
        assert held == []
        gen.close()

        assert list(runner.imap_unordered(slow_affine, [], 5, UNIT_S)) == []
        with pytest.raises(ZeroDivisionError):  # a task's error reaches the caller (after retries)
            list(runner.imap_unordered(operator.truediv, [1, 2], 0))
    finally:
        runner.close()
    leftover = _new_children(before)
    assert leftover == [], [p.cmdline() for p in leftover]
    assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in workers)


def _run_with_deadline(
    runner: DaskRunner, fn: Callable[..., Any], items: list[Any], *args: Any, deadline_s: float = 8.0
) -> list[tuple[int, Any]]:
    """``sorted(runner.imap_unordered(...))`` or an AssertionError after ``deadline_s`` (the call runs in
    a thread; closing the runner later ends it)."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["result"] = sorted(runner.imap_unordered(fn, items, *args), key=operator.itemgetter(0))
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            box["error"] = exc

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(deadline_s)
    assert not t.is_alive(), f"imap_unordered still running after {deadline_s} s"
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]


def test_dask_runner_repeated_calls_with_equal_arguments(restore_threads: None) -> None:
    """A batch runs one ``imap_unordered`` per slide on one runner, with the same predictor each time."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    runner = local_dask_runner(2)
    # Make the race deterministic: the client sends key releases in batches every 10 ms but a scatter
    # directly, so a scatter right after a release may reach the scheduler first. Batching every
    # 200 ms makes that order certain instead of likely (private attribute: if it moves, the test
    # still runs, just with the natural timing).
    stream = getattr(runner.client, "scheduler_comm", None)
    if stream is not None and hasattr(stream, "interval"):
        stream.interval = 0.2
    try:
        for _ in range(3):
            assert _run_with_deadline(runner, operator.mul, [1, 2, 3], 5) == [(0, 5), (1, 10), (2, 15)]
        assert _run_with_deadline(runner, operator.or_, [{}], {"k": 1}) == [(0, {"k": 1})]
        assert _run_with_deadline(runner, operator.or_, [{}], {"k": 2}) == [(0, {"k": 2})]
    finally:
        runner.close()
    assert _new_children(before) == []
