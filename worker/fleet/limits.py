"""The fleet's API budget, shared by every worker on every host through the SQL database.

- `MODELLIX_MAX_RPS`: API requests per second (submits and polls together).
  A GCRA slot schedule in one row: each request reserves the next free slot
  under a row lock and sleeps until it, so the fleet's requests come out evenly
  spaced with no burst, and waiting costs no CPU.
- `MODELLIX_MAX_IN_FLIGHT`: Modellix tasks submitted and not finished. A
  submit claim counts the active jobs under the same row lock, so two workers
  cannot both take the last place.
- A pause (after a 429, 401 or 402, see worker.modellix.policy) stops the whole
  fleet: it is written to the row, and every worker reads it before its next
  request (at most PAUSE_REFRESH seconds late when no rate limit is set).
  A pause for the balance (402) is watched by the sweep (`watch_balance`):
  lifted once the balance is positive, renewed while it is not.

Submits wait in place (`claim_turn`): the thread keeps its unacked message
(acks_late, prefetch 1) for up to MAX_HOLD rather than send it back to the
broker to wait there, so a backlog under a limit is delivered about once per
job. Per process one submit thread at a time contends for the row (the others
queue at a process-local gate), and it books a slot only when the fleet's next
free one is within HORIZON, so polls keep priority; a stopping worker gives the
waiting messages back at once. A poll waits at most MAX_SLEEP
(`take_request_slot`), else OverBudget and it is rescheduled on this process's
poll timer; polls have threads of their own (worker.polling.timer), so waiting
submits never starve them.

The SQL is in models.budget. Clocks: slots are epoch seconds from each host's
clock; hosts must be NTP-synced.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from models import budget
from models.db import Executor
from worker import modellix, resources
from worker.config import MAX_BUDGET_SLEEP
from worker.fleet.gate import Gate
from worker.modellix.policy import BALANCE_RECHECK, for_balance

T = TypeVar("T")

# A poll waits at most this long for its request slot; longer, and it is rescheduled
# (config bounds KLING_SUBMIT_GRACE by it, from when a submit slept after its claim).
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
# How long a submit waits in place for the fleet's budget, holding its (unacked) message, before it
# gives the message back to the broker: well under RabbitMQ's consumer_timeout (30 min), past which
# the broker closes the channel.
MAX_HOLD = 300.0
# A submit books a request slot only when the fleet's next free one is at most this far ahead: submits
# never fill the slot queue far ahead, so polls (which book up to MAX_SLEEP ahead) keep priority and
# the tasks in flight finish first. Half a second keeps a waiting submit ready for the next free slot.
HORIZON = 0.5
# How often a waiting submit reads a pause for the balance again: the sweep lifts it at any moment.
PAUSE_RECHECK = 1.0
# How often the thread at the head of a process's queue looks again for a free place in flight.
PLACE_RECHECK = (0.1, 0.3)
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
    res = resources.get()
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


def _book(res: resources.Resources, max_rps: float, horizon: float) -> float:
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
    limit = resources.settings().max_in_flight
    if limit is None:
        return
    budget.lock(ex)
    if budget.count_in_flight(ex, up_to=limit) >= limit:
        raise OverBudget(0.0, f"{limit} tasks in flight")


def claim_turn(claim: Callable[[Executor], T]) -> T:
    """Wait in place until the fleet's budget lets one more submit go, then `claim` the job (committed)
    and return what `claim` returned: the caller sends the job right after.

    The wait holds the message (acks_late: unacked, one per thread) instead of sending it back to the
    broker again and again. Raises OverBudget when the wait would outlast MAX_HOLD, or when the worker
    is stopping (nothing claimed): the caller gives the message back.

    With a rate limit the request slot is booked before the claim, so a job waiting for budget is
    never left `submitting`; a slot booked for a duplicate delivery goes unused. With an in-flight
    limit the claim counts the places under the row lock, as before; the count taken when booking is
    only a hint (it includes this process's booked, unclaimed submits) that keeps slots from being
    booked for a full fleet.

    Without either limit nothing is locked per job: the pause is read from this process's cache (at
    most once per PAUSE_REFRESH), as a request without a rate limit always did.
    """
    res = resources.get()
    cfg = res.settings
    deadline = time.monotonic() + MAX_HOLD
    if cfg.max_rps is None and cfg.max_in_flight is None:
        _wait_out_pause(res, deadline)
        with res.statement() as ex:
            return claim(ex)
    gate = res.once("submit_gate", _SubmitGate)
    while True:
        with gate.held(res.stopping, deadline) as entered:
            if not entered:
                raise _given_back(res, "the fleet's budget")
            if cfg.max_rps is None:
                return _claim_in_place(res, claim, deadline)
            slot = _book_submit(res, cfg.max_rps, gate, deadline)
        # Out of the gate, so the next thread in this process can book the slot after this one.
        try:
            if not _on_time(slot):
                continue
            try:
                return _claim_counted(res, claim)
            except OverBudget:
                continue  # another process took the last place since the booking: the slot goes unused
        finally:
            gate.booked(-1)


class _SubmitGate(Gate):
    """This process's submit threads' queue at the budget row, and its booked, unclaimed submits."""

    def __init__(self) -> None:
        super().__init__()
        self._booked = 0
        self._count = threading.Lock()

    def booked(self, change: int = 0) -> int:
        with self._count:
            self._booked += change
            return self._booked


def stop_waiting() -> None:
    """The worker is stopping: the submits waiting for this process's turn give their messages back now."""
    gate = resources.get().made("submit_gate")
    if gate is not None:
        gate.interrupt()


def _book_submit(res: resources.Resources, max_rps: float, gate: _SubmitGate, deadline: float) -> float:
    """Book a request slot for a submit once the fleet's next free one is within HORIZON; its time.

    Only the thread holding this process's gate gets here, so each process has at most one submit
    at the row lock at a time.
    """
    limit = res.settings.max_in_flight
    while True:
        with res.transaction() as s:
            row = budget.lock(s)
            now = time.time()  # once the lock is held (see _book)
            _saw(res, row.paused_until, row.pause_reason or "")
            if row.paused_until > now:
                wait, reason = row.paused_until - now, row.pause_reason or "paused"
            elif limit is not None and budget.count_in_flight(s, up_to=limit) + gate.booked() >= limit:
                wait, reason = random.uniform(*PLACE_RECHECK), _FULL
            else:
                slot = max(row.next_slot, now)
                if slot - now <= HORIZON:
                    budget.book_slot(s, slot + HEADROOM / max_rps)
                    gate.booked(+1)
                    return float(slot)
                wait, reason = slot - now - HORIZON, "rate limit"
        _wait(res, wait, reason, deadline)


def _claim_in_place(res: resources.Resources, claim: Callable[[Executor], T], deadline: float) -> T:
    """An in-flight limit without a rate limit: claim as soon as a place is free (holding the gate)."""
    while True:
        _wait_out_pause(res, deadline)
        try:
            return _claim_counted(res, claim)
        except OverBudget:
            _wait(res, random.uniform(*PLACE_RECHECK), _FULL, deadline)


def _claim_counted(res: resources.Resources, claim: Callable[[Executor], T]) -> T:
    """`claim` in the transaction that counts the places in flight (OverBudget if none is free)."""
    with res.transaction() as s:
        check_in_flight(s)
        return claim(s)


def _wait_out_pause(res: resources.Resources, deadline: float) -> None:
    """Wait while the fleet is paused, as this process's cache of the row says."""
    while True:
        until, reason = _current_pause(res)
        wait = until - time.time()
        if wait <= 0:
            return
        _wait(res, wait, reason, deadline)


_FULL = "no place in flight"


def _wait(res: resources.Resources, wait: float, reason: str, deadline: float) -> None:
    """Wait `wait` seconds in place, or less for a wait whose end may come sooner (a full fleet, a pause
    for the balance); OverBudget if that is past `deadline` or the worker stops meanwhile."""
    left = deadline - time.monotonic()
    ends_known = reason != _FULL and not for_balance(reason)
    if ends_known and wait > left:
        raise _over(wait, reason)  # a 429's pause or a slot too far off: back to the broker at once
    if left <= 0:
        raise _over(wait, reason) if reason != _FULL else OverBudget(0.0, reason)
    step = wait if ends_known else min(wait, PAUSE_RECHECK)
    if res.stopping.wait(min(step, left)):
        raise _given_back(res, reason)


def _given_back(res: resources.Resources, waiting_for: str) -> OverBudget:
    if res.stopping.is_set():
        return OverBudget(0.0, "the worker is stopping")
    return OverBudget(0.0, f"waited {MAX_HOLD:.0f}s for {waiting_for}")


def pause(seconds: float, reason: str) -> None:
    """Stop the whole fleet's API calls for `seconds` (never shortens a longer pause).

    Through a database outage only this process pauses; the others learn of
    the limit from their own tries, as they would have before it was shared.
    """
    res = resources.get()
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
    res = resources.get()
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
    cfg = resources.settings()
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


def _current_pause(res: resources.Resources) -> tuple[float, str]:
    seen = res.pause
    if time.monotonic() - seen.read_at > PAUSE_REFRESH:
        with res.statement() as ex:
            row = budget.read(ex)
        if row is not None:
            _saw(res, row.paused_until, row.pause_reason or "")
        seen.read_at = time.monotonic()
    return seen.until, seen.reason


def _saw(res: resources.Resources, until: float, reason: str) -> None:
    """The pause as the budget row says, for this process (its metrics, and the next request without a rate limit)."""
    res.pause.until, res.pause.reason = until, reason
