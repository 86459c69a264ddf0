"""Each worker process's own poll scheduler: a timer heap feeding a thread pool.

A poll is a short HTTP call every few seconds per job; sending each one
through the broker as a countdown message costs more than the poll itself
(publish, consume, an ETA timer and a prefetch change per message). Here the
process that submitted a job keeps polling it locally. Nothing is lost when
the process dies: the job row says when its next poll is due, and the beat
sweep re-dispatches every overdue poll through the broker (tracking.sweep).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("kling_worker.poller")

PollFn = Callable[[str, int], "tuple[int, float] | None"]


class Poller:
    def __init__(self, poll: PollFn, threads: int):
        self._poll = poll
        self._heap: list[tuple[float, int, str, int]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kling-poll")
        self._thread = threading.Thread(target=self._run, name="kling-poller", daemon=True)
        self._thread.start()

    def schedule(self, job_id: str, seq: int, delay: float) -> None:
        with self._wake:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._order), job_id, seq))
            self._wake.notify()

    def pending(self) -> int:
        return len(self._heap)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._wake.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                _, _, job_id, seq = heapq.heappop(self._heap)
            self._pool.submit(self._one, job_id, seq)

    def _one(self, job_id: str, seq: int) -> None:
        try:
            following = self._poll(job_id, seq)
        except Exception:
            # The row keeps its lease; the sweep re-dispatches the poll when it runs out.
            log.exception("job %s: poll %d failed; the sweep will retry it", job_id, seq)
            return
        if following is not None:
            self.schedule(job_id, *following)


_pollers: dict[int, Poller] = {}
_lock = threading.Lock()


def get(poll: PollFn, threads: int) -> Poller:
    """This process's poller, started on first use (after any fork)."""
    pid = os.getpid()
    found = _pollers.get(pid)
    if found is None:
        with _lock:
            found = _pollers.get(pid) or _pollers.setdefault(pid, Poller(poll, threads))
    return found
