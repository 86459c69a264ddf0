"""The fleet's API budget, shared by every worker on every host through the SQL database.

- `MODELLIX_MAX_RPS`: API requests per second (submits and polls together).
  A GCRA slot schedule in one row: each request reserves the next free slot
  under a row lock and sleeps until it, so the fleet's requests come out evenly
  spaced with no burst, and waiting costs no CPU.
- `MODELLIX_MAX_IN_FLIGHT`: Modellix tasks submitted and not finished. A
  submit claim counts the active jobs under the same row lock, so two workers
  cannot both take the last place.
- A 429 (or 401/402) pauses the whole fleet: the pause is written to the row,
  and every worker reads it before its next request.

A wait longer than MAX_SLEEP is not slept in a worker thread: the caller
gets OverBudget and schedules the job again (it waits in `queued`). For a
place in flight, a few threads per process (WAITERS) look again every few
hundred milliseconds for up to MAX_SLEEP, so a freed place is taken at once
without every waiting job hammering the lock; polls have threads of their own
(worker.poller), so waiting submits never starve them.

Clocks: slots are epoch seconds from each host's clock; hosts must be NTP-synced.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Connection, func, select, update
from sqlalchemy.orm import Session

from models import ACTIVE, ApiBudget, Job, JobStatus
from worker import runtime

T = TypeVar("T")
NAME = "modellix"
MAX_SLEEP = 5.0
# Slots are spaced 10 % wider than 1/MAX_RPS: a request leaves a little after
# its slot (thread wake-up, GIL), and that jitter must not add up to a burst
# over the limit in the API's own one-second window. At 5 % a loaded 2-core
# machine still showed 22 requests in one window at MAX_RPS=20.
HEADROOM = 1.10
# Without a rate limit nobody locks the row per request; the pause is read at most this often.
PAUSE_REFRESH = 1.0
WAITERS = 2
_waiters = threading.BoundedSemaphore(WAITERS)
_budget = ApiBudget.__table__
IN_FLIGHT = [s.value for s in ACTIVE | {JobStatus.submitting}]


class OverBudget(Exception):
    def __init__(self, retry_in: float, reason: str):
        super().__init__(f"over the API budget ({reason}); retry in {retry_in:.1f}s")
        self.retry_in = retry_in
        self.reason = reason


@dataclass
class _Pause:
    until: float = 0.0
    reason: str = ""
    read_at: float = float("-inf")


_pause = _Pause()


def take_request_slot() -> None:
    """Wait until this process may send one API request."""
    cfg = runtime.settings()
    if cfg.max_rps is None:
        until, reason = _current_pause()
        wait = until - time.time()
    else:
        with runtime.session() as s:
            row = _lock(s)
            # Read the clock only once the lock is held: a time taken before a
            # contended lock would put the slot in the past and let a burst out.
            now = time.time()
            slot = max(row.next_slot, now, row.paused_until)
            wait, reason = slot - now, row.pause_reason or "rate limit"
            if wait <= MAX_SLEEP:
                s.execute(update(_budget).where(_budget.c.name == NAME).values(next_slot=slot + HEADROOM / cfg.max_rps))
    if wait > MAX_SLEEP:
        raise OverBudget(wait + random.uniform(0, 1), reason)
    if wait > 0:
        time.sleep(wait)


def check_in_flight(ex: Connection | Session) -> None:
    """Within the caller's transaction: raise OverBudget if no place is free.

    The budget row stays locked until that transaction commits the claim, which
    serialises submit claims across the fleet while the limit is set.
    """
    limit = runtime.settings().max_in_flight
    if limit is None:
        return
    _lock(ex)
    busy = ex.execute(
        select(func.count()).select_from(select(Job.id).where(Job.status.in_(IN_FLIGHT)).limit(limit).subquery())
    ).scalar_one()
    if busy >= limit:
        raise OverBudget(0.0, f"{limit} tasks in flight")


def wait_for_place(claim: Callable[[], T]) -> T:
    """Run `claim` (which calls check_in_flight) until a place in flight is free.

    One of WAITERS threads keeps trying for up to MAX_SLEEP; any other thread,
    or a wait that runs out, gets OverBudget.
    """
    deadline = time.monotonic() + MAX_SLEEP
    waiting = False
    try:
        while True:
            try:
                return claim()
            except OverBudget:
                waiting = waiting or _waiters.acquire(blocking=False)
                if not waiting or time.monotonic() > deadline:
                    raise
            time.sleep(random.uniform(0.1, 0.3))
    finally:
        if waiting:
            _waiters.release()


def pause(seconds: float, reason: str) -> None:
    """Stop the whole fleet's API calls for `seconds` (never shortens a longer pause)."""
    until = time.time() + seconds
    with runtime.connect() as ex:
        ex.execute(
            update(_budget)
            .where(_budget.c.name == NAME, _budget.c.paused_until < until)
            .values(paused_until=until, pause_reason=reason)
        )
    if until > _pause.until:
        _pause.until, _pause.reason = until, reason


def status(s: Session) -> dict[str, object]:
    cfg = runtime.settings()
    row = s.get(ApiBudget, NAME)
    in_flight = s.execute(select(func.count()).where(Job.status.in_(IN_FLIGHT))).scalar_one()
    paused = row is not None and row.paused_until > time.time()
    return {
        "max_rps": cfg.max_rps,
        "max_in_flight": cfg.max_in_flight,
        "in_flight": in_flight,
        "paused_for": round(row.paused_until - time.time(), 1) if paused else 0,
        "pause_reason": row.pause_reason if paused else None,
    }


def forget() -> None:
    """Drop this process's cached pause (settings changed, e.g. between tests)."""
    global _pause
    _pause = _Pause()


def _lock(ex: Connection | Session) -> Any:
    row = ex.execute(select(_budget).where(_budget.c.name == NAME).with_for_update()).first()
    if row is None:
        raise RuntimeError("api_budget row missing: run `kling-worker db upgrade`")
    return row


def _current_pause() -> tuple[float, str]:
    if time.monotonic() - _pause.read_at > PAUSE_REFRESH:
        with runtime.session() as s:
            row = s.get(ApiBudget, NAME)
        if row is not None:
            _pause.until, _pause.reason = row.paused_until, row.pause_reason or ""
        _pause.read_at = time.monotonic()
    return _pause.until, _pause.reason
