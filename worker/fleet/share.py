"""Which queued job is submitted next: tenants share the fleet's turns by weight, each in its own line.

The job table is the line (models.store). A submit's turn (worker.fleet.places) takes the next job
in one transaction under the budget row's lock (`take_next`), so every worker on every host follows
one order:

- **Tenants by weight** (start-time fair queueing): each tenant has a virtual time; the tenant with
  queued jobs and the lowest one goes next, and its virtual time moves on by 1/weight. A tenant that
  had nothing waiting starts again from the fleet's clock (the virtual time of the last turn given),
  so time spent idle is not saved up as a burst. Tenants with work get turns in proportion to their
  weights, whatever their backlogs; a tenant alone gets every turn.
- **Caps per tenant**: a tenant at its `max_in_flight`, or before its own next rate slot
  (`max_rps`, spaced as the fleet's, worker.fleet.slots.HEADROOM), is passed over.
- **Within a tenant**, by place in line (`line_of`): a job's line is the time it was queued less
  KLING_PRIORITY_AGING seconds per step of priority. A job of higher priority goes ahead of the
  jobs queued less than that long before it; so every AGING seconds a job waits is worth a step of
  priority, and no job waits forever behind jobs of a higher priority that keep coming.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from models import budget, lifecycle, store, tenants
from models.db import Executor
from models.tenants import Waiting
from worker.fleet.slots import HEADROOM


@dataclass(frozen=True)
class Turn:
    """A tenant's turn: the fleet's clock after it, the tenant's virtual time and rate slot after it."""

    tenant: str
    clock: float
    vtime: float
    next_slot: float | None  # None: the tenant has no rate limit of its own


def line_of(queued_at: float, priority: int, aging: float) -> float:
    """A job's place in its tenant's line (lower goes first): `queued_at` (epoch seconds), less `aging`
    seconds for each step of priority."""
    return queued_at - priority * aging


def eligible(tenant: Waiting, now: float) -> bool:
    """Whether the tenant's own caps let one more of its jobs go at `now` (epoch seconds)."""
    if tenant.max_in_flight is not None and tenant.in_flight >= tenant.max_in_flight:
        return False
    return tenant.max_rps is None or tenant.next_slot <= now


def choose(waiting: Sequence[Waiting], clock: float, now: float) -> Turn | None:
    """The next turn among the tenants with due jobs (None: every one is at a cap). Ties go by name."""
    ready = [t for t in waiting if eligible(t, now)]
    if not ready:
        return None
    best = min(ready, key=lambda t: (max(t.vtime, clock), t.name))
    start = max(best.vtime, clock)
    next_slot = max(best.next_slot, now) + HEADROOM / best.max_rps if best.max_rps else None
    return Turn(best.name, start, start + 1.0 / best.weight, next_slot)


def ready(ex: Executor, at: datetime) -> bool:
    """Whether a job may be taken now: some tenant has due jobs and is under its own caps (a read,
    without the budget row's lock: the turn itself checks again)."""
    now = time.time()
    return any(eligible(t, now) for t in tenants.waiting(ex, at))


def take_next(ex: Executor, at: datetime, chosen: list[str]) -> store.Taken | None:
    """In the caller's transaction: take the next job by the rules above (now `submitting`); None if no
    tenant with due jobs may go now. The chosen job's id is appended to `chosen` before it is taken, so
    that a caller who never sees the commit knows which claim to release."""
    row = budget.lock(ex)
    now = time.time()
    waiting = tenants.waiting(ex, at)
    turn = choose(waiting, row.fair_clock, now)
    if turn is None:
        return None
    job_id = store.first_in_line(ex, turn.tenant, at)
    if job_id is None:
        return None  # taken by a transaction that does not lock the budget row (a cancel)
    chosen.append(job_id)
    taken = lifecycle.take(ex, job_id, at)
    if taken is None:
        return None
    if len(waiting) > 1 or turn.next_slot is not None:
        # A tenant alone with no rate of its own needs no bookkeeping: when another arrives, both
        # start from the clock (max(vtime, clock)), as if its turns had been recorded.
        tenants.took_turn(ex, turn.tenant, at, vtime=turn.vtime, next_slot=turn.next_slot)
        budget.set_fair_clock(ex, turn.clock)
    return taken
