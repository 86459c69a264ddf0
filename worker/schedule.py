"""The poll schedule, from the first poll to the deadline: the one place that knows it.

With the defaults (KLING_POLL_FIRST 2 s, KLING_POLL_FACTOR x1.25, KLING_POLL_MAX
30 s) polls land 2, 4.5, 7.6, 11.5, 16.4, 22.5 ... s after submission: a 10 s
task is seen finished by the 4th poll at 11.5 s, an hour-long one costs about
130 polls. A task not finished KLING_POLL_DEADLINE seconds after submission
fails as `timeout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from worker.config import Settings


@dataclass(frozen=True)
class NextPoll:
    """Poll number `seq` of a job, due `delay` seconds from now."""

    seq: int
    delay: float


def gap(polls_done: int, settings: Settings) -> float:
    """Seconds from poll number `polls_done` (0: the submission) to the next."""
    return min(settings.poll_max, settings.poll_first * settings.poll_factor**polls_done)


def first(settings: Settings) -> NextPoll:
    return NextPoll(0, gap(0, settings))


def deadline(submitted_at: datetime, settings: Settings) -> datetime:
    return submitted_at + timedelta(seconds=settings.poll_deadline)
