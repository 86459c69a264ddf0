"""When the fleet's API budget has no room for a request now: `OverBudget` sends it away (come back in so
many seconds, and why), or a submit waits in place for it (`wait`, one step at a time, until its deadline).

The budget is full for one of three reasons: the fleet is paused (worker.fleet.pause), the next free
request slot is too far off (worker.fleet.slots), or every place in flight is taken
(worker.fleet.places). This module knows none of them: each caller says how long its wait should last,
whether it may end sooner than that, and when a job sent away should look again.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from worker.backoff import Jitter, delay

if TYPE_CHECKING:
    from worker.resources import Resources

# A wait whose end may come sooner than said (a pause for the balance, which the sweep lifts at any
# moment; a full fleet) looks again at least this often.
RECHECK = 1.0
# Jobs sent away together come back spread over this many seconds more than their wait.
SPREAD = 1.0
STOPPING = "the worker is stopping"


class OverBudget(Exception):
    """The fleet's budget lets this request or submit go no sooner than `retry_in` seconds from now."""

    def __init__(self, retry_in: float, reason: str):
        super().__init__(f"over the API budget ({reason}); retry in {retry_in:.1f}s")
        self.retry_in = retry_in
        self.reason = reason


def over(look_again: float, reason: str) -> OverBudget:
    """Send the job away for `look_again` seconds, and up to SPREAD more so that jobs held back
    together do not all come back at once."""
    return OverBudget(delay(1, base=look_again, jitter=Jitter.added, spread=SPREAD), reason)


def wait(
    res: Resources,
    seconds: float,
    reason: str,
    deadline: float,
    *,
    may_end_sooner: bool = False,
    look_again: float | None = None,
) -> None:
    """Wait `seconds` in place, or at most RECHECK of them when the wait `may_end_sooner` (the caller
    then looks again); OverBudget if that is past `deadline` (time.monotonic()) or the worker stops
    meanwhile. A job sent away at its deadline comes back after `look_again` seconds (None: at once,
    and the caller backs off as it sees fit)."""
    left = deadline - time.monotonic()
    if not may_end_sooner and seconds > left:
        raise over(seconds, reason)  # a 429's pause or a slot too far off: back to the broker at once
    if left <= 0:
        raise over(look_again, reason) if look_again is not None else OverBudget(0.0, reason)
    step = min(seconds, RECHECK) if may_end_sooner else seconds
    if res.stopping.wait(min(step, left)):
        raise OverBudget(0.0, STOPPING)
