"""When to try again: submit backoff and the poll schedule."""

from __future__ import annotations

import random

from worker.config import Settings


def retry_delay(attempt: int, settings: Settings, retry_after: float | None = None) -> float:
    """Exponential backoff with full jitter for attempt 1, 2, ...; Retry-After is a floor."""
    ceiling = min(settings.backoff_max, settings.backoff_base * 2 ** (attempt - 1))
    delay = random.uniform(ceiling / 2, ceiling)
    return max(delay, retry_after or 0.0)


def poll_delay(polls_done: int, settings: Settings) -> float:
    """Gap before the next poll after `polls_done` polls.

    With the defaults (2 s, x1.25, cap 30 s) polls land at 2, 4.5, 7.6, 11.5,
    16.4, 22.5 ... s after submission: a 10 s task is seen finished by the 4th
    poll at 11.5 s, and an hour-long one costs about 130 polls.
    """
    return min(settings.poll_max, settings.poll_first * settings.poll_factor**polls_done)
