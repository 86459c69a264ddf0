"""The fleet's API budget, shared by every worker on every host through the SQL database.

- `MODELLIX_MAX_RPS`: API requests per second (submits and polls together).
  A GCRA slot schedule in one row: each request reserves the next free slot
  under a row lock and sleeps until it, so the fleet's requests come out evenly
  spaced with no burst, and waiting costs no CPU.
- `MODELLIX_MAX_IN_FLIGHT`: Modellix tasks submitted and not finished. A
  submit claim counts the active jobs under the same row lock, so two workers
  cannot both take the last place.
- A pause (after a 429, 401 or 402, see worker.api_errors) stops the whole
  fleet: it is written to the row, and every worker reads it before its next
  request (at most PAUSE_REFRESH seconds late when no rate limit is set).
  A pause for the balance (402) is watched by the sweep (`watch_balance`):
  lifted once the balance is positive, renewed while it is not.

A wait longer than MAX_SLEEP is not slept in a worker thread: the caller gets
OverBudget and the job waits in `queued`. For a place in flight, a few
threads per process (WAITERS) look again every few hundred milliseconds for up
to MAX_SLEEP (`place_tries`), so a freed place is taken at once without every
waiting job hammering the lock; polls have threads of their own
(worker.poller), so waiting submits never starve them.

The SQL is in models.budget. Clocks: slots are epoch seconds from each host's
clock; hosts must be NTP-synced.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from models import budget
from models.db import Executor
from worker import modellix, runtime
from worker.api_errors import BALANCE_RECHECK, for_balance
from worker.config import MAX_BUDGET_SLEEP

# A wait longer than this goes back to the broker instead of holding a thread
# (config bounds KLING_SUBMIT_GRACE by it).
MAX_SLEEP = MAX_BUDGET_SLEEP
# Slots are spaced 20 % wider than 1/MAX_RPS: a request leaves a little after
# its slot (thread wake-up, GIL), and that jitter must not add up to a burst
# over the limit in the API's own one-second window. At 5 % a loaded 2-core
# machine showed 22 requests in one window at MAX_RPS=20, and at 10 % still 21
# (1 run in 11 with a mutation run beside it); 20 % leaves 200 ms of jitter.
HEADROOM = 1.20
# A thread that wakes more than this after its request slot does not send on it (see _on_time).
LATE = 0.05
# After this many late wake-ups in a row the request waits for a later turn (polls: rescheduled),
# LATE_RETRY seconds on, rather than spend the fleet's slots on a machine that cannot keep them.
LATE_TRIES = 5
LATE_RETRY = 1.0
# Without a rate limit nobody locks the row per request; the pause is read at most this often.
PAUSE_REFRESH = 1.0
# Threads per process that wait in place for a free place in flight.
WAITERS = 2
# During a 402 pause, the most often one process asks for the balance. The sweep runs once a
# second somewhere in the fleet, so the fleet as a whole asks at most once a second.
BALANCE_EVERY = 5.0

log = logging.getLogger("kling_worker.limits")


class OverBudget(Exception):
    def __init__(self, retry_in: float, reason: str):
        super().__init__(f"over the API budget ({reason}); retry in {retry_in:.1f}s")
        self.retry_in = retry_in
        self.reason = reason


def take_request_slot() -> None:
    """Wait until this process may send one API request; OverBudget if that is more than MAX_SLEEP away."""
    res = runtime.get()
    max_rps = res.settings.max_rps
    if max_rps is None:
        until, reason = _current_pause(res)
        wait = until - time.time()
        if wait > MAX_SLEEP:
            raise _over(wait, reason)
        if wait > 0:
            time.sleep(wait)
        return
    for _ in range(LATE_TRIES):
        if _on_time(_book(res, max_rps, MAX_SLEEP)):
            return
    raise OverBudget(LATE_RETRY + random.uniform(0, 1), "threads woke late for their request slots")


def _book(res: runtime.Resources, max_rps: float, horizon: float) -> float:
    """Book the fleet's next free request slot; its time. OverBudget if it is more than `horizon` away."""
    with res.transaction() as s:
        row = budget.lock(s)
        # Read the clock only once the lock is held: a time taken before a
        # contended lock would put the slot in the past and let a burst out.
        now = time.time()
        _saw(res, row.paused_until, row.pause_reason or "")
        slot = max(row.next_slot, now, row.paused_until)
        if slot - now > horizon:
            raise _over(slot - now, row.pause_reason if row.paused_until > now else "rate limit")
        budget.book_slot(s, slot + HEADROOM / max_rps)
    return float(slot)


def _on_time(slot: float) -> bool:
    """Sleep until `slot`; whether this thread then runs close enough to it to send on it.

    The API counts requests in any one-second window. Slots spaced HEADROOM/MAX_RPS
    apart put at most MAX_RPS/HEADROOM of them in a window; a request that leaves up
    to LATE after its slot brings at most LATE * MAX_RPS/HEADROOM more, which the
    headroom absorbs (with what is left for the send itself). A thread the OS wakes
    much later (a loaded machine: CPU starvation) would send on a stale slot, in the
    same window as the requests on the next slots, which went on time: that is how
    requests bunched over the limit. So a late thread does not send; it books again
    at the end of the queue, and its missed slot simply stays unused (the fleet's
    rate only drops). A 0.05 s bound never rebooks on an idle machine, where a sleep
    overshoots by well under a millisecond.
    """
    wait = slot - time.time()
    if wait > 0:
        time.sleep(wait)
    return time.time() - slot <= LATE


def _over(wait: float, reason: str) -> OverBudget:
    look_again = min(wait, BALANCE_RECHECK) if for_balance(reason) else wait
    return OverBudget(look_again + random.uniform(0, 1), reason)


def check_in_flight(ex: Executor) -> None:
    """Within the caller's transaction: raise OverBudget if no place in flight is free.

    The budget row stays locked until that transaction commits the claim, which
    serialises submit claims across the fleet while the limit is set.
    """
    limit = runtime.settings().max_in_flight
    if limit is None:
        return
    budget.lock(ex)
    if budget.count_in_flight(ex, up_to=limit) >= limit:
        raise OverBudget(0.0, f"{limit} tasks in flight")


def place_tries() -> Generator[None, None, None]:
    """Yield once per try at a place in flight; between tries, wait while this thread may.

    One of WAITERS threads per process keeps trying for up to MAX_SLEEP; any
    other thread gets a single try. The caller stops iterating once its try
    succeeds, and raises its last OverBudget when the tries run out.
    """
    deadline = time.monotonic() + MAX_SLEEP
    yield
    waiters = runtime.get().once("place_waiters", lambda: threading.BoundedSemaphore(WAITERS))
    if not waiters.acquire(blocking=False):
        return
    try:
        while time.monotonic() < deadline:
            time.sleep(random.uniform(0.1, 0.3))
            yield
    finally:
        waiters.release()


def pause(seconds: float, reason: str) -> None:
    """Stop the whole fleet's API calls for `seconds` (never shortens a longer pause).

    Through a database outage only this process pauses; the others learn of
    the limit from their own tries, as they would have before it was shared.
    """
    res = runtime.get()
    until = time.time() + seconds
    try:
        with res.statement() as ex:
            budget.pause_until(ex, until, reason)
    except Exception as exc:
        res.put_off(exc, "fleet pauses")
    if until > res.pause.until:
        res.pause.until, res.pause.reason = until, reason


@dataclass
class _BalanceAsked:
    at: float = float("-inf")  # time.monotonic() of this process's last question


def watch_balance() -> str | None:
    """While the fleet is paused for its balance (402), ask the API for the balance: lift the pause once
    it is positive, else renew it for KLING_ACCOUNT_RETRY, so that no job spends a paid submit to learn
    the same. What happened: "resumed", "renewed", "unknown" (the API did not say), or None (not asked).

    Called by the sweep. The question takes no request slot: one GET every few seconds while nothing
    else is sent.
    """
    res = runtime.get()
    try:
        with res.statement() as ex:
            row = budget.read(ex)
    except Exception as exc:
        res.put_off(exc, "balance checks")
        return None
    if row is None or row.paused_until <= time.time() or not for_balance(row.pause_reason):
        return None
    asked = res.once("balance_asked", _BalanceAsked)
    if time.monotonic() - asked.at < BALANCE_EVERY:
        return None
    asked.at = time.monotonic()
    try:
        balance = res.client.balance()
    except modellix.ModellixError as exc:
        log.info("the fleet waits for credit; asking for the balance failed: %s", exc.message)
        return "unknown"
    if balance > 0:
        try:
            with res.statement() as ex:
                lifted = budget.lift_pause(ex, row.pause_reason)
        except Exception as exc:
            res.put_off(exc, "balance checks")
            return None
        if lifted:
            _saw(res, 0.0, "")
            log.info("the account's balance is %g: the fleet's pause for credit is lifted", balance)
        return "resumed"
    pause(res.settings.account_retry, row.pause_reason)
    log.debug("the account's balance is %g: the fleet stays paused", balance)
    return "renewed"


def status(ex: Executor) -> dict[str, Any]:
    """The limits, the tasks in flight and any pause, for `jobs stats`."""
    cfg = runtime.settings()
    row = budget.read(ex)
    now = time.time()
    paused_for: float = 0
    reason: str | None = None
    if row is not None and row.paused_until > now:
        paused_for, reason = round(row.paused_until - now, 1), row.pause_reason
    return {
        "max_rps": cfg.max_rps,
        "max_in_flight": cfg.max_in_flight,
        "in_flight": budget.count_in_flight(ex),
        "paused_for": paused_for,
        "pause_reason": reason,
    }


def _current_pause(res: runtime.Resources) -> tuple[float, str]:
    seen = res.pause
    if time.monotonic() - seen.read_at > PAUSE_REFRESH:
        with res.statement() as ex:
            row = budget.read(ex)
        if row is not None:
            _saw(res, row.paused_until, row.pause_reason or "")
        seen.read_at = time.monotonic()
    return seen.until, seen.reason


def _saw(res: runtime.Resources, until: float, reason: str) -> None:
    """The pause as the budget row says, for this process (its metrics, and the next request without a rate limit)."""
    res.pause.until, res.pause.reason = until, reason
