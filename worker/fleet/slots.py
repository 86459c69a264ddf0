"""Request slots: `MODELLIX_MAX_RPS`, API requests per second (submits and polls together) for the whole fleet.

A GCRA slot schedule in one row (models.budget): each request reserves the next
free slot under a row lock and sleeps until it, so the fleet's requests come out
evenly spaced with no burst, and waiting costs no CPU. A poll waits at most
MAX_SLEEP for its slot (`take_request_slot`), else OverBudget and it is
rescheduled on this process's poll timer; a submit books its slot through
worker.fleet.places, which uses `on_time` and HEADROOM from here. Without a rate
limit a request only waits out the fleet pause (worker.fleet.pause).

Clocks: slots are epoch seconds from each host's clock; hosts must be NTP-synced.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from models import budget
from worker.config import MAX_BUDGET_SLEEP
from worker.fleet import pause, waiting

if TYPE_CHECKING:
    from worker.resources import Resources

# A poll waits at most this long for its request slot; longer, and it is rescheduled
# (config bounds KLING_SUBMIT_GRACE by it, from when a submit slept after its claim).
MAX_SLEEP = MAX_BUDGET_SLEEP
# Slots are spaced 20 % wider than 1/MAX_RPS: a request leaves a little after
# its slot (thread wake-up, GIL), and that jitter must not add up to a burst
# over the limit in the API's own one-second window. At 5 % a loaded 2-core
# machine showed 22 requests in one window at MAX_RPS=20, and at 10 % still 21
# (1 run in 11 with a mutation run beside it); 20 % leaves 200 ms of jitter.
HEADROOM = 1.20
# A thread that wakes more than this after its request slot does not send on it (see on_time).
LATE = 0.05
# After this many late wake-ups in a row the request waits for a later turn (polls: rescheduled),
# LATE_RETRY seconds on, rather than spend the fleet's slots on a machine that cannot keep them.
LATE_TRIES = 5
LATE_RETRY = 1.0


def take_request_slot(res: Resources) -> None:
    """Wait until this process may send one API request; OverBudget if that is more than MAX_SLEEP away."""
    max_rps = res.settings.max_rps
    if max_rps is None:
        pause.sleep_out(res, MAX_SLEEP)
        return
    for _ in range(LATE_TRIES):
        if on_time(_book(res, max_rps, MAX_SLEEP)):
            return
    raise waiting.over(LATE_RETRY, "threads woke late for their request slots")


def _book(res: Resources, max_rps: float, horizon: float) -> float:
    """Book the fleet's next free request slot; its time. OverBudget if it is more than `horizon` away."""
    with res.transaction() as s:
        row = budget.lock(s)
        # Read the clock only once the lock is held: a time taken before a
        # contended lock would put the slot in the past and let a burst out.
        now = time.time()
        pause.saw(res, row.paused_until, row.pause_reason or "")
        slot = max(row.next_slot, now, row.paused_until)
        if slot - now > horizon:
            reason = row.pause_reason if row.paused_until > now else "rate limit"
            raise waiting.over(pause.look_again(slot - now, reason), reason)
        budget.book_slot(s, slot + HEADROOM / max_rps)
    return float(slot)


def on_time(slot: float) -> bool:
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
