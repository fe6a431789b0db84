"""A runner that starts the real one when it is first needed, or ahead of need in the background.

Starting worker processes (or submitting a job queue's jobs) takes seconds; a slide first spends seconds on the
client alone (adaptation, the int8 engine's calibration and quantisation), with the machine's other cores idle.
``prestart`` overlaps the two: the slide asks for the runner as soon as it knows regions will run, the start
proceeds in a background thread, and the first task finds the workers up (figures: :meth:`LazyRunner.prestart`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from histoseg.distributed.runner import TaskRunner
from histoseg.errors import HistosegError

log = logging.getLogger(__name__)


class LazyRunner:
    """Starts the wrapped runner at the first task, so work that turns out to be done starts no cluster.

    A start that fails is remembered and raised again for every later use, without a second attempt. Once
    closed it stays closed: a task asked for afterwards (a pipelined batch's look-ahead slide after an
    interrupt) raises instead of starting a second cluster. ``small`` (with ``small_below``) is the runner
    started instead when the first request's work, ``size(items)`` (default: the number of tasks), is below
    ``small_below``: for a lone small slide, starting worker processes costs more than they save. ``ahead=False``:
    :meth:`prestart` does nothing (the runner runs tasks in this process).
    """

    def __init__(
        self,
        start: Callable[[], TaskRunner],
        *,
        small: Callable[[], TaskRunner] | None = None,
        small_below: float = 0,
        size: Callable[[Sequence[Any]], float] = len,
        ahead: bool = True,
    ) -> None:
        self._start = start
        self._may_prestart = ahead  # False for a runner that runs tasks in the asking thread (see prestart)
        self._small = small
        self._small_below = small_below
        self._size = size
        self._runner: TaskRunner | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()  # a pipelined batch asks from two threads: start one runner, not two
        self._closed = False
        self._ahead: threading.Thread | None = None  # the background start of :meth:`prestart`
        self._ahead_lock = threading.Lock()

    @property
    def started(self) -> bool:
        return self._runner is not None

    def runner(self, work: float | None = None) -> TaskRunner:
        """The started runner; the first call starts it (``work``: the size of the request that needs it)."""
        with self._lock:
            if self._closed:
                raise HistosegError("the task runner was closed (the batch ended or was interrupted)")
            if self._error is not None:
                raise self._error
            if self._runner is None:
                few = self._small is not None and work is not None and work < self._small_below
                try:
                    self._runner = self._small() if few and self._small is not None else self._start()
                except Exception as exc:
                    self._error = exc
                    raise
            return self._runner

    def prestart(self, items: Sequence[Any]) -> None:
        """Start the runner now in a background thread, for a request of ``items`` that will come.

        For the client's own work before its first tasks (a slide's adaptation and engine calibration): the
        workers start meanwhile on the idle cores. The first :meth:`runner` call waits for that start and raises
        its error, if any, as a lazy start would have. No effect when started, starting, closed or failed, and for
        a runner that works in this process (``ahead=False``, or the ``small`` one for so few tasks): it sets its
        math libraries' thread counts when it starts, and OpenMP keeps those per thread, so it must start in the
        thread that runs its tasks (started in the background, ``--workers 1`` ran on two threads).
        Measured on the 2-core AMD EPYC (AVX2), 10000² slide, ``--workers 2``, default settings, whole process, 3
        runs each in turn: wall 90.6 -> 86.9 s (median; each pair 0.95-1.00), CPU 163.8 -> 158.4 s."""
        work = self._size(items)
        if not self._may_prestart or (self._small is not None and work < self._small_below):
            return  # in-process runners start at once, and their thread settings hold in the thread that starts them
        with self._ahead_lock:  # not the start's lock: a start under way must not hold this call up
            if self._ahead is not None or self._closed or self._runner is not None or self._error is not None:
                return
            self._ahead = threading.Thread(
                target=self._start_ahead, args=(work,), name="histoseg-prestart", daemon=True
            )
            self._ahead.start()

    def _start_ahead(self, work: float) -> None:
        try:
            self.runner(work)
        except Exception as exc:  # noqa: BLE001 - kept in self._error: the first real request raises it
            log.debug("background start of the task runner failed: %s", exc)

    @property
    def n_workers(self) -> int:
        return self.runner().n_workers

    def imap_unordered(self, fn: Callable[..., Any], items: Sequence[Any], *args: Any) -> Iterator[tuple[int, Any]]:
        return self.runner(self._size(items)).imap_unordered(fn, items, *args)

    def close(self) -> None:
        with self._ahead_lock:
            ahead = self._ahead
        if ahead is not None and ahead is not threading.current_thread():
            ahead.join()  # a start under way finishes first, then is closed here (never left running)
        with self._lock:
            self._closed = True
            if self._runner is not None:
                self._runner.close()
                self._runner = None

    def __enter__(self) -> LazyRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
