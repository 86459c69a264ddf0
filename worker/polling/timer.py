"""Each worker process's own poll timer: a heap of due times feeding a thread pool.

A poll is a short HTTP call every few seconds per job; sending each one
through the broker as a countdown message costs more than the poll itself
(publish, consume, an ETA timer and a prefetch change per message). Here the
process that submitted a job keeps polling it locally: `schedule` runs a
function after a delay on one of the pool's threads. Nothing is lost when the
process dies: the job row says when its next poll is due, and the beat sweep
re-dispatches every overdue poll through the broker (tracking.sweep). A
process that is asked to stop `drain`s its timer and hands what was scheduled
to the other workers at once (worker.wiring.tasks).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

log = logging.getLogger("kling_worker.poller")


class Poller:
    def __init__(self, threads: int):
        self._heap: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._stopped = False
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kling-poll")
        self._running: set[Future[None]] = set()
        self._thread = threading.Thread(target=self._run, name="kling-poller", daemon=True)
        self._thread.start()

    def schedule(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) on a pool thread `delay` seconds from now."""
        with self._wake:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._order), fn, args))
            self._wake.notify()

    def pending(self) -> int:
        return len(self._heap)

    def alive(self) -> bool:
        """Whether the timer thread runs: it ends when the poller is stopped (or on a bug)."""
        return self._thread.is_alive()

    def stop(self) -> None:
        """Drop what is scheduled and end the timer thread (the job rows still say what is due)."""
        with self._wake:
            self._stopped = True
            self._heap.clear()
            self._wake.notify()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def drain(self, timeout: float) -> list[tuple[float, Callable[..., Any], tuple[Any, ...]]]:
        """Stop the timer, give running calls up to `timeout` seconds to end, and return what was
        still scheduled (those calls may have scheduled more) as (seconds left, fn, args)."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join()
        wait(list(self._running), timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._wake:
            now = time.monotonic()
            left = [(max(0.0, due - now), fn, args) for due, _, fn, args in sorted(self._heap)]
            self._heap.clear()
        return left

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._wake.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._stopped:
                    return
                _, _, fn, args = heapq.heappop(self._heap)
            future = self._pool.submit(self._one, fn, args)
            self._running.add(future)
            future.add_done_callback(self._running.discard)

    @staticmethod
    def _one(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception:
            # The job row keeps its lease; the sweep re-dispatches the poll when it runs out.
            log.exception(
                "%s%r failed; the sweep will make it again",
                getattr(fn, "__name__", fn),
                args,
                extra={"event": "scheduled_call_failed"},
            )
