"""How long to wait before trying again: the one home of the backoff formula (`delay`) and of reading a
server's Retry-After header (`parse_retry_after`: Modellix's answers and webhook receivers').

Every wait before another try is `delay(attempt, base=…, cap=…, jitter=…)`; each caller keeps its own
numbers (its base, cap and jitter) beside the code that explains them:

| caller                                                       | base               | cap               | jitter       |
|--------------------------------------------------------------|--------------------|-------------------|--------------|
| a submit tried again (modellix.policy.retry_delay)           | KLING_BACKOFF_BASE | KLING_BACKOFF_MAX | equal        |
| a message put off by a database outage (ops.outages.backoff) | 1 s                | 30 s              | equal        |
| a fact held through a database outage (facts)                | 0.25 s             | 2 s               | none         |
| an image to archive again (results.delivery)                 | 2 s                | none              | none         |
| a webhook attempt (results.webhooks.next_attempt_delay)      | 10 s               | 1 h               | equal        |
| a job sent away over the fleet's budget (fleet.waiting.over) | its wait           | none              | added, 0-1 s |

It imports nothing but the standard library, so every layer may use it.
"""

from __future__ import annotations

import email.utils
import enum
import math
import random
import time


class Jitter(enum.Enum):
    """How the exponential wait `w` (base × 2^(attempt-1), at most cap) is spread, so that tries that
    failed together do not all come back at once."""

    none = "none"  # exactly w
    full = "full"  # uniform in [0, w]
    equal = "equal"  # uniform in [w/2, w]: never less than half the wait
    added = "added"  # w + uniform in [0, spread]: the wait itself, then up to `spread` seconds more


def delay(
    attempt: int,
    *,
    base: float,
    cap: float = math.inf,
    jitter: Jitter = Jitter.none,
    spread: float = 0.0,
    at_least: float | None = None,
) -> float:
    """Seconds to wait after failed try number `attempt` (1 = the first): `base` doubling with each
    attempt, at most `cap`, spread by `jitter` (`spread`: the width of Jitter.added), and never less
    than `at_least` (a server's Retry-After) when given."""
    try:
        grown = base * 2.0 ** (attempt - 1)
    except OverflowError:  # so many attempts that only the cap can answer
        grown = math.inf if base > 0 else 0.0
    wait = min(cap, grown)
    if jitter is Jitter.full:
        wait = random.uniform(0, wait)
    elif jitter is Jitter.equal:
        wait = random.uniform(wait / 2, wait)
    elif jitter is Jitter.added:
        wait = wait + random.uniform(0, spread)
    return wait if at_least is None else max(wait, at_least)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After is seconds or an HTTP date; anything else is ignored."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
