"""How an outage of the database or the broker shows in one worker process's log: a WARNING when
it starts, a summary every SUMMARY_EVERY seconds while it lasts, one line when it ends.

During an outage every message, poll and sweep meets the same error; a
traceback for each (about 2,200 in a 10 s PostgreSQL stop, 62 in a 5 s
RabbitMQ one, measured) buries what an operator needs to know. Our code that
meets a database outage and can wait tells the process's Outage what it put
off (`defer`) instead of raising; the first statement begun after the failures
that succeeds ends it (`ok`, a single attribute read while nothing is wrong).
The broker's side is Celery's and kombu's: BrokerLogShape turns their line per
reconnection attempt, lost ack and unsent beat entry into the same shape.
Errors that are not an outage keep their tracebacks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

from sqlalchemy import exc as sa_exc

from worker.backoff import Jitter, delay

log = logging.getLogger("kling_worker.outages")

# Seconds between the "still unreachable" lines of one outage.
SUMMARY_EVERY = 30.0
# The longest a message waits on the broker between tries through an outage.
BACKOFF_MAX = 30.0
# A poll put off by an outage looks at the database again after this many seconds.
OUTAGE_RECHECK = 2.0


class Outage:
    def __init__(self, name: str, meanwhile: str, holds_answers: bool = False):
        self.name = name
        self.meanwhile = meanwhile  # what the workers do until it is back, for the first line
        self.holds_answers = holds_answers
        self._lock = threading.Lock()
        self._since: float | None = None  # time.monotonic() of the first failure
        self._last_failure = float("-inf")
        self._summary_at = 0.0
        self._deferred: Counter[str] = Counter()
        self._held = 0

    @property
    def down(self) -> bool:
        return self._since is not None

    def defer(self, what: str, exc: BaseException | str) -> None:
        """One piece of work (`what`: "message", "poll", "sweep" …) put off because of the outage."""
        self._failed(exc, what)

    def still(self, exc: BaseException | str) -> None:
        """Work already counted by `defer` met the outage again."""
        self._failed(exc, None)

    def _failed(self, exc: BaseException | str, what: str | None) -> None:
        now = time.monotonic()
        with self._lock:
            self._last_failure = now
            if what is not None:
                self._deferred[what] += 1
            if self._since is None:
                self._since = self._summary_at = now
                log.warning(
                    "%s unreachable (%s); meanwhile %s",
                    self.name,
                    reason(exc),
                    self.meanwhile,
                    extra={"event": "outage_started"},
                )
            elif now - self._summary_at >= SUMMARY_EVERY:
                self._summary_at = now
                took = now - self._since
                log.warning(
                    "%s still unreachable after %.0fs (%s); %s",
                    self.name,
                    took,
                    reason(exc),
                    self._tally(),
                    extra={"event": "outage_continues"},
                )

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
            log.warning(
                "%s reachable again after %.0fs; %s", self.name, took, self._tally(), extra={"event": "outage_ended"}
            )
            self._since = None
            self._deferred.clear()

    def quiet_for(self) -> float:
        """Seconds since this process last met the outage (infinite if it never did)."""
        return time.monotonic() - self._last_failure

    def _tally(self) -> str:
        put_off = ", ".join(f"{count} {what}" for what, count in sorted(self._deferred.items()))
        held = f"; answers from Modellix held in memory now: {self._held}" if self.holds_answers else ""
        return f"put off meanwhile: {put_off or 'nothing'}{held}"


def backoff(retries: int) -> float:
    """Seconds before a message put off by an outage is tried again: doubling from 1 s, jittered."""
    return delay(retries + 1, base=1.0, cap=BACKOFF_MAX, jitter=Jitter.equal)


def database() -> Outage:
    return Outage(
        "database",
        "messages go back to the broker with a delay, polls wait, and answers from Modellix "
        "are held in memory and written when it is back",
        holds_answers=True,
    )


def broker(beat: bool = False) -> Outage:
    if beat:
        return Outage("broker", "beat cannot send the sweep; the first sweep sent afterwards catches up")
    return Outage(
        "broker",
        "running tasks finish (their acks are lost; the broker delivers those messages again and they find "
        "their jobs handled), polls go on from this worker's timer, and the worker reconnects every few seconds",
    )


class BrokerLogShape(logging.Filter):
    """Attached to Celery's and kombu's loggers (BROKER_LOGGERS): their lines about a lost broker
    connection become one Outage; every other record passes unchanged."""

    def __init__(self, outage: Outage):
        super().__init__()
        self.outage = outage
        self._last_send = float("-inf")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "celery.worker.consumer.connection":
            self.outage.ok(time.monotonic())  # "Connected to …": the consumer is back
            return True
        text = record.getMessage()
        if text.startswith("Scheduler: Sending due task"):
            # Beat logs no success: a send that no failure followed before the next one got through.
            # (These lines are INFO: at a WARNING log level beat's outage shows no end line.)
            self.outage.ok(self._last_send)
            self._last_send = time.monotonic()
            return True
        if text.startswith(("Couldn't ack", "Couldn't reject")):
            # After a reconnection, for each task that ran across it: expected, and harmless.
            record.msg, record.args = "%s (the broker delivers its message again; it finds its job handled)", (text,)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
            record.__dict__["event"] = "ack_lost"  # worker.ops.logs names Celery's other lines
            return True
        for start, what in _BROKER_LINES:
            if text.startswith(start):
                cause = record.exc_info[1] if record.exc_info and record.exc_info[1] else text.splitlines()[0]
                self.outage.defer(what, cause)
                return False
        return True


# The loggers whose connection-loss lines BrokerLogShape reshapes.
BROKER_LOGGERS = (
    "celery.worker.consumer.consumer",
    "celery.worker.consumer.connection",
    "celery.worker.loops",
    "celery.worker.request",
    "celery.beat",
)
# How each such line starts, and what it means was put off.
_BROKER_LINES = (
    ("consumer: Connection to broker lost", "reconnections"),
    ("consumer: Cannot connect to", "reconnections"),
    ("Error cleaning up after event loop", "reconnections"),
    ("beat: Connection error", "reconnections"),
    ("beat pidbox: Connection error", "reconnections"),
    ("Message Error: Couldn't apply scheduled task", "beat entries not sent"),
)


def shape_broker_logs(beat: bool = False) -> None:
    """Install BrokerLogShape in this process (a worker, or beat), replacing one it inherited."""
    shape = BrokerLogShape(broker(beat))
    for name in BROKER_LOGGERS:
        found = logging.getLogger(name)
        for old in [f for f in found.filters if isinstance(f, BrokerLogShape)]:
            found.removeFilter(old)
        found.addFilter(shape)


def reason(exc: BaseException | str) -> str:
    """The first line of the driver's message: what failed, without the statement or its parameters."""
    if isinstance(exc, str):
        return exc[:200]
    inner = exc.orig if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None else exc
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[0][:200] if text else ''}"
