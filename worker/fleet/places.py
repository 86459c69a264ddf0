"""Places in flight: `MODELLIX_MAX_IN_FLIGHT`, Modellix tasks submitted and not finished, for the whole
fleet; and a submit's turn (`claim_turn`), which waits for the fleet's budget.

A submit claim counts the active jobs under the budget row's lock (`check_in_flight`), so two workers
cannot both take the last place.

Each process's one taker thread (worker.wiring.dispatcher) waits here for its next turn, for up to
MAX_HOLD at a time; the jobs themselves wait in the table. It books a slot only when the fleet's next
free one is within HORIZON, so polls keep priority; a stopping worker's wait ends at once (every wait
is on `res.stopping`). Polls have threads of their own (worker.polling.timer), so submits waiting for
their turn never starve them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from models import budget
from models.db import Executor
from worker.fleet import pause, slots, waiting
from worker.fleet.waiting import OverBudget

if TYPE_CHECKING:
    from worker.resources import Resources

T = TypeVar("T")

# How long one wait for a turn lasts before the taker looks at the line again (its jobs may have been
# cancelled meanwhile).
MAX_HOLD = 300.0
# A submit books a request slot only when the fleet's next free one is at most this far ahead: submits
# never fill the slot queue far ahead, so polls (which book up to MAX_SLEEP ahead) keep priority and
# the tasks in flight finish first. Half a second keeps a waiting submit ready for the next free slot.
HORIZON = 0.5
# How often the thread at the head of a process's queue looks again for a free place in flight.
PLACE_RECHECK = (0.1, 0.3)
FULL = "no place in flight"


def check_in_flight(res: Resources, ex: Executor) -> None:
    """Within the caller's transaction: raise OverBudget if no place in flight is free.

    The budget row stays locked until that transaction commits the claim, which
    serialises submit claims across the fleet while the limit is set.
    """
    limit = res.settings.max_in_flight
    if limit is None:
        return
    budget.lock(ex)
    if budget.count_in_flight(ex, up_to=limit) >= limit:
        raise OverBudget(0.0, f"{limit} tasks in flight")


def claim_turn(res: Resources, claim: Callable[[Executor], T]) -> T:
    """Wait until the fleet's budget lets one more submit go, then `claim` the job (committed) and
    return what `claim` returned: the caller sends the job right after.

    Raises OverBudget when the wait would outlast MAX_HOLD, or when the worker is stopping (nothing
    claimed).

    With a rate limit the request slot is booked before the claim, so a job waiting for budget is
    never left `submitting`; a slot booked when another process took the last job goes unused. With
    an in-flight limit the claim counts the places under the row lock; the count taken when booking
    is only a hint that keeps slots from being booked for a full fleet.

    Without either limit the pause is read from this process's cache (at most once per PAUSE_REFRESH),
    as a request without a rate limit always did, and `claim` runs in a transaction of its own.
    """
    cfg = res.settings
    deadline = time.monotonic() + MAX_HOLD
    if cfg.max_rps is None and cfg.max_in_flight is None:
        pause.wait_out(res, deadline)
        with res.atomic() as conn:
            return claim(conn)
    if cfg.max_rps is None:
        return _claim_in_place(res, claim, deadline)
    while True:
        if res.stopping.is_set() or time.monotonic() >= deadline:
            raise _given_back(res, "the fleet's budget")
        slot = _book_submit(res, cfg.max_rps, deadline)
        if not slots.on_time(slot):
            continue
        try:
            return _claim_counted(res, claim)
        except OverBudget:
            continue  # another process took the last place since the booking: the slot goes unused


def _book_submit(res: Resources, max_rps: float, deadline: float) -> float:
    """Book a request slot for a submit once the fleet's next free one is within HORIZON; its time."""
    limit = res.settings.max_in_flight
    while True:
        with res.transaction() as s:
            row = budget.lock(s)
            now = time.time()  # once the lock is held (see slots._book)
            pause.saw(res, row.paused_until, row.pause_reason or "")
            if row.paused_until > now:
                wait, reason = row.paused_until - now, row.pause_reason or "paused"
            elif limit is not None and budget.count_in_flight(s, up_to=limit) >= limit:
                wait, reason = random.uniform(*PLACE_RECHECK), FULL
            else:
                slot = max(row.next_slot, now)
                if slot - now <= HORIZON:
                    budget.book_slot(s, slot + slots.HEADROOM / max_rps)
                    return float(slot)
                wait, reason = slot - now - HORIZON, "rate limit"
        _wait(res, wait, reason, deadline)


def _claim_in_place(res: Resources, claim: Callable[[Executor], T], deadline: float) -> T:
    """An in-flight limit without a rate limit: claim as soon as a place is free."""
    while True:
        pause.wait_out(res, deadline)
        try:
            return _claim_counted(res, claim)
        except OverBudget:
            _wait(res, random.uniform(*PLACE_RECHECK), FULL, deadline)


def _wait(res: Resources, seconds: float, reason: str, deadline: float) -> None:
    """One step of a submit's wait in place: a full fleet may free a place at any moment; a pause or a
    slot further off than HORIZON ends when it says, but for a pause for the balance (see pause.wait)."""
    if reason == FULL:
        waiting.wait(res, seconds, reason, deadline, may_end_sooner=True)
    else:
        pause.wait(res, seconds, reason, deadline)


def _claim_counted(res: Resources, claim: Callable[[Executor], T]) -> T:
    """`claim` in the transaction that counts the places in flight (OverBudget if none is free)."""
    with res.atomic() as conn:
        check_in_flight(res, conn)
        return claim(conn)


def _given_back(res: Resources, waiting_for: str) -> OverBudget:
    if res.stopping.is_set():
        return OverBudget(0.0, waiting.STOPPING)
    return OverBudget(0.0, f"waited {MAX_HOLD:.0f}s for {waiting_for}")
