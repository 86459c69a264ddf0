"""Each worker process's submit threads: take the next job from the line when the fleet's budget lets
one go, and send it.

One taker thread per process waits for the fleet's budget (worker.fleet.places) and takes the next
job in the fleet-wide order (worker.fleet.share), one at a time. A pool of sender threads, as many as
the worker's task threads (KLING_CONCURRENCY), sends each taken job and records the answer
(worker.submission). The taker takes a job only when a sender is free, so a job is `submitting` only
while it is being sent. With nothing to take it looks at the table again every IDLE seconds, or at
once when this process queues a job (`nudge`).

Nothing waits on the broker: a message is acked once its job is queued, and a job waiting for its
turn is a row, which `jobs cancel` can end and `jobs show` places in its line. A stopping worker's
taker stops taking; the senders finish what they send (`stop`), then its polls are handed over
(worker.wiring.tasks.hand_over).
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from models import db
from models.job import utcnow
from models.store import Taken
from worker import submission
from worker.fleet import share
from worker.fleet.waiting import OverBudget
from worker.ops import outages
from worker.resources import Resources

log = logging.getLogger("kling_worker.dispatcher")

# With nothing to take, the taker looks at the table again this often (jobs queued by other processes).
IDLE = (0.2, 0.4)
# After an unexpected error the taker waits this long before it looks again.
AFTER_ERROR = 1.0

AfterSend = Callable[[Resources, submission.Outcome], None]


class Dispatcher:
    def __init__(self, res: Resources, threads: int, after: AfterSend):
        self._res = res
        self._after = after
        self._work = threading.Event()
        self._free = threading.Semaphore(threads)
        self._senders = ThreadPoolExecutor(threads, thread_name_prefix="kling-submit")
        self._taker = threading.Thread(target=self._take_all, name="kling-taker", daemon=True)
        self._taker.start()

    def nudge(self) -> None:
        """A job was queued here: look at the line now."""
        self._work.set()

    def alive(self) -> bool:
        return self._taker.is_alive()

    def stop(self, timeout: float) -> None:
        """Stop taking jobs; wait up to `timeout` seconds for the senders to finish what they send."""
        self._res.stopping.set()
        self._work.set()
        self._taker.join(timeout)
        self._senders.shutdown(wait=True, cancel_futures=False)

    def _take_all(self) -> None:
        res = self._res
        failures = 0
        taken: Taken | submission.Outcome | None = None
        while not res.stopping.is_set():
            if not self._free.acquire(timeout=1.0):
                continue
            try:
                # After a job was taken, more are likely waiting: the turn itself finds out.
                taken = self._take_one(look_first=not isinstance(taken, Taken))
                failures = 0
            except Exception as exc:
                self._free.release()
                failures += 1
                self._after_error(exc, failures)
                continue
            if isinstance(taken, Taken):
                self._senders.submit(self._send, taken)
                continue
            self._free.release()
            if taken is None:
                self._idle()
            else:
                self._after(res, taken)

    def _take_one(self, look_first: bool) -> Taken | submission.Outcome | None:
        """A job taken from the line; None if no job may go now; an Outcome for a claim whose commit was
        unseen. `look_first`: see whether any job may go before waiting for a turn (which books a slot)."""
        res = self._res
        self._work.clear()
        if look_first:
            with res.statement() as ex:
                if not share.ready(ex, utcnow()):
                    return None
        try:
            return submission.take_next(res)
        except OverBudget:
            return None  # the wait ran out (MAX_HOLD) or the worker stops: look again

    def _idle(self) -> None:
        self._work.wait(random.uniform(*IDLE))

    def _after_error(self, exc: Exception, failures: int) -> None:
        res = self._res
        if db.unreachable(exc):
            res.outage.defer("submits", exc)
            res.stopping.wait(outages.backoff(failures))
            return
        log.exception("taking the next job failed; trying again in %.0fs", AFTER_ERROR)
        res.stopping.wait(AFTER_ERROR)

    def _send(self, taken: Taken) -> None:
        try:
            outcome = submission.send(self._res, taken)
            self._after(self._res, outcome)
        except Exception:
            # A bug: the job stays `submitting` and the sweep resolves it (tracking.resolve_interrupted).
            log.exception("job %s: sending it failed", taken.job_id)
        finally:
            self._free.release()


_running: Dispatcher | None = None
_lock = threading.Lock()
_pid = 0


def start(res: Resources, after: AfterSend, threads: int | None = None) -> Dispatcher:
    """This process's dispatcher, started on the first call in the process, with `threads` senders
    (default: KLING_CONCURRENCY)."""
    global _running, _pid
    with _lock:
        if _running is None or _pid != os.getpid():
            _running, _pid = Dispatcher(res, threads or res.settings.concurrency, after), os.getpid()
        return _running


def nudge() -> None:
    """A job was queued by this process: its dispatcher, if it runs, looks at the line now."""
    found = _running
    if found is not None and _pid == os.getpid():
        found.nudge()


def stop(timeout: float) -> None:
    """Stop this process's dispatcher, if it runs (the worker is stopping)."""
    global _running
    with _lock:
        found, _running = (_running, None) if _pid == os.getpid() else (None, _running)
    if found is not None:
        found.stop(timeout)
