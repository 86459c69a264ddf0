"""The fleet pause: every worker stops calling the API after a 429, 401 or 402 (see worker.modellix.policy).

- Written to the budget row (`pause_fleet`), so the whole fleet stops; never shortens a longer pause.
- Read before each request: this process keeps the row's pause as it last read it (`PauseSeen`, in
  Resources.pause), refreshed by every booking under the row lock, and without a rate limit (nobody
  locks the row per request) read again at most every PAUSE_REFRESH seconds (`current`).
- Waited out: a request sleeps through a short one (`sleep_out`), a submit waits in place (`wait_out`,
  `wait`), anything longer sends the job away (worker.fleet.waiting.OverBudget).
- Its kind (`PauseKind`) comes from the stored reason in one place (`kind_of`). The reason is the text
  operators see in `jobs stats` and the row; it starts with the HTTP status that caused the pause.
- A pause for the balance (402) is watched (`watch_balance`) by the sweep and by the submits that wait
  in place for it, at most every BALANCE_EVERY seconds per process: lifted once the balance is
  positive, renewed while it is not, and the jobs held back look again every BALANCE_RECHECK seconds
  instead of sleeping through a top-up.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from models import budget
from worker import modellix
from worker.fleet import waiting
from worker.modellix.policy import BALANCE_RECHECK

if TYPE_CHECKING:
    from worker.resources import Resources

# Without a rate limit nobody locks the row per request; the pause is read at most this often.
PAUSE_REFRESH = 1.0
# During a 402 pause, the most often one process asks for the balance. The sweep runs once a
# second somewhere in the fleet, so the fleet as a whole asks at most once a second.
BALANCE_EVERY = 5.0

# Named for the module these lines came from before the fleet's modules were split: log filters use it.
log = logging.getLogger("kling_worker.limits")


class PauseKind(enum.Enum):
    """Why the fleet is paused, by the HTTP status that paused it."""

    rate_limited = "429"
    unauthorized = "401"
    no_balance = "402"


def kind_of(reason: str | None) -> PauseKind | None:
    """The kind of a pause from its stored reason ("<status> <message>", as worker.modellix.policy
    writes it); None for any other text."""
    if not reason or reason[3:4] != " ":
        return None
    try:
        return PauseKind(reason[:3])
    except ValueError:
        return None


@dataclass
class PauseSeen:
    """The fleet pause as this process last read it from the budget row."""

    until: float = 0.0
    reason: str = ""
    read_at: float = float("-inf")  # time.monotonic() of the last read


@dataclass
class BalanceAsked:
    """When this process last asked the API for the balance."""

    at: float = float("-inf")  # time.monotonic()


def pause_fleet(res: Resources, seconds: float, reason: str) -> None:
    """Stop the whole fleet's API calls for `seconds` (never shortens a longer pause).

    Through a database outage only this process pauses; the others learn of
    the limit from their own tries, as they would have before it was shared.
    """
    until = time.time() + seconds
    try:
        with res.statement() as ex:
            budget.pause_until(ex, until, reason)
    except Exception as exc:
        res.put_off(exc, "fleet pauses")
    if until > res.pause.until:
        res.pause.until, res.pause.reason = until, reason


def current(res: Resources) -> tuple[float, str]:
    """The pause (until when, in epoch seconds, and why) as this process knows it, read from the row
    if the copy is older than PAUSE_REFRESH."""
    seen = res.pause
    if time.monotonic() - seen.read_at > PAUSE_REFRESH:
        with res.statement() as ex:
            row = budget.read(ex)
        if row is not None:
            saw(res, row.paused_until, row.pause_reason or "")
        seen.read_at = time.monotonic()
    return seen.until, seen.reason


def saw(res: Resources, until: float, reason: str) -> None:
    """The pause as the budget row says, for this process (its metrics, and the next request without a rate limit)."""
    res.pause.until, res.pause.reason = until, reason


def look_again(seconds: float, reason: str) -> float:
    """When a job held back by a wait of `seconds` (for a pause with this reason, or for anything
    else) should look again: when the wait ends, or within BALANCE_RECHECK during a pause for the
    balance, which the sweep lifts at any moment."""
    return min(seconds, BALANCE_RECHECK) if kind_of(reason) is PauseKind.no_balance else seconds


def sleep_out(res: Resources, longest: float) -> None:
    """Sleep until this process's copy of the pause ends; OverBudget if that is more than `longest` away."""
    until, reason = current(res)
    left = until - time.time()
    if left > longest:
        raise waiting.over(look_again(left, reason), reason)
    if left > 0:
        time.sleep(left)


def wait(res: Resources, seconds: float, reason: str, deadline: float) -> None:
    """One step of a submit's wait in place (worker.fleet.waiting.wait) for a pause of `seconds` more, or
    for anything else whose end is known (a request slot further off): a pause for the balance may be
    lifted at any moment, anything else ends when it says."""
    balance = kind_of(reason) is PauseKind.no_balance
    if balance:
        # The waiting submit asks for the balance itself rather than count on the sweep: when every
        # thread of every worker waits here, no thread is left to run the sweep, and the fleet would
        # sleep through a top-up until MAX_HOLD gave the messages back (seen in tests/e2e).
        watch_balance(res)
    waiting.wait(res, seconds, reason, deadline, may_end_sooner=balance, look_again=look_again(seconds, reason))


def wait_out(res: Resources, deadline: float) -> None:
    """Wait in place while the fleet is paused, as this process's copy of the row says."""
    while True:
        until, reason = current(res)
        left = until - time.time()
        if left <= 0:
            return
        wait(res, left, reason, deadline)


def watch_balance(res: Resources) -> str | None:
    """While the fleet is paused for its balance (402), ask the API for the balance: lift the pause once
    it is positive, else renew it for KLING_ACCOUNT_RETRY, so that no job spends a paid submit to learn
    the same. What happened: "resumed", "renewed", "unknown" (the API did not say), or None (not asked).

    Called by the sweep and by the submits waiting in place for credit. The question takes no request
    slot: one GET every few seconds while nothing else is sent. Asked a moment ago, it does nothing,
    not even read the row.
    """
    asked = res.balance_asked
    if time.monotonic() - asked.at < BALANCE_EVERY:
        return None
    try:
        with res.statement() as ex:
            row = budget.read(ex)
    except Exception as exc:
        res.put_off(exc, "balance checks")
        return None
    if row is None or row.paused_until <= time.time() or kind_of(row.pause_reason) is not PauseKind.no_balance:
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
            saw(res, 0.0, "")
            log.info("the account's balance is %g: the fleet's pause for credit is lifted", balance)
        return "resumed"
    pause_fleet(res, res.settings.account_retry, row.pause_reason)
    log.debug("the account's balance is %g: the fleet stays paused", balance)
    return "renewed"
