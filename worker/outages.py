"""How a database outage shows in one worker process's log: a WARNING when it starts, a summary
every SUMMARY_EVERY seconds while it lasts, one line when it ends.

During an outage every message, poll and sweep meets the same error; a
traceback for each (about 2,200 in a 10 s PostgreSQL stop, measured) buries
what an operator needs to know. Code that meets the outage and can wait tells
the process's Outage what it put off (`defer`) instead of raising; every
statement that succeeds afterwards ends it (`ok`, a single attribute read
while nothing is wrong). Errors that are not an outage keep their tracebacks.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter

from sqlalchemy import exc as sa_exc

log = logging.getLogger("kling_worker.outages")

# Seconds between the "still unreachable" lines of one outage.
SUMMARY_EVERY = 30.0
# The longest a message waits on the broker between tries through an outage.
BACKOFF_MAX = 30.0
# A poll, or a job given back before its POST, put off by an outage is tried again after this.
RETRY_AFTER = 2.0


class Outage:
    def __init__(self, name: str, meanwhile: str):
        self.name = name
        self.meanwhile = meanwhile  # what the workers do until it is back, for the first line
        self._lock = threading.Lock()
        self._since: float | None = None  # time.monotonic() of the first failure
        self._last_failure = float("-inf")
        self._summary_at = 0.0
        self._deferred: Counter[str] = Counter()
        self._held = 0

    @property
    def down(self) -> bool:
        return self._since is not None

    def defer(self, what: str, exc: BaseException) -> None:
        """One piece of work (`what`: "message", "poll", "sweep" …) put off because of the outage."""
        self._failed(exc, what)

    def still(self, exc: BaseException) -> None:
        """Work already counted by `defer` met the outage again."""
        self._failed(exc, None)

    def _failed(self, exc: BaseException, what: str | None) -> None:
        now = time.monotonic()
        with self._lock:
            self._last_failure = now
            if what is not None:
                self._deferred[what] += 1
            if self._since is None:
                self._since = self._summary_at = now
                log.warning("%s unreachable (%s); meanwhile %s", self.name, reason(exc), self.meanwhile)
            elif now - self._summary_at >= SUMMARY_EVERY:
                self._summary_at = now
                took = now - self._since
                log.warning("%s still unreachable after %.0fs (%s); %s", self.name, took, reason(exc), self._tally())

    def holding(self, change: int) -> None:
        """An answer from the API starts (+1) or stops (-1) waiting in memory for the database."""
        with self._lock:
            self._held += change

    def ok(self, began: float) -> None:
        """A statement begun at `began` (time.monotonic()) succeeded: if it began after the last
        failure, the outage is over. One that was already under way when the failures began proves nothing."""
        if self._since is None:
            return
        with self._lock:
            if self._since is None or began < self._last_failure:
                return
            took = time.monotonic() - self._since
            log.warning("%s reachable again after %.0fs; %s", self.name, took, self._tally())
            self._since = None
            self._deferred.clear()

    def quiet_for(self) -> float:
        """Seconds since this process last met the outage (infinite if it never did)."""
        return time.monotonic() - self._last_failure

    def _tally(self) -> str:
        put_off = ", ".join(f"{count} {what}" for what, count in sorted(self._deferred.items()))
        return f"put off meanwhile: {put_off or 'nothing'}; answers from Modellix held in memory now: {self._held}"


def backoff(retries: int) -> float:
    """Seconds before a message put off by an outage is tried again: doubling from 1 s, jittered."""
    ceiling = min(BACKOFF_MAX, 2.0**retries)
    return random.uniform(ceiling / 2, ceiling)


def database() -> Outage:
    return Outage(
        "database",
        "messages go back to the broker with a delay, polls wait, and answers from Modellix "
        "are held in memory and written when it is back",
    )


def reason(exc: BaseException) -> str:
    """The first line of the driver's message: what failed, without the statement or its parameters."""
    inner = exc.orig if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None else exc
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[0][:200] if text else ''}"
