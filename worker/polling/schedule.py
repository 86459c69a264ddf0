"""The poll schedule, from the first poll to the deadline: the one place that knows it.

The configured schedule. With the defaults (KLING_POLL_FIRST 2 s,
KLING_POLL_FACTOR x1.25, KLING_POLL_MAX 30 s) polls land 2, 4.5, 7.6, 11.5,
16.4, 22.5 ... s after submission: a 10 s task is seen finished by the 4th poll
at 11.5 s, an hour-long one costs about 130 polls. A job follows it when its
shape has not been learned yet (or KLING_POLL_LEARN is off).

The learned schedule. Tasks of one *shape* (resolution, n, number of input
images: `Shape`) take about as long as each other, so the fleet learns, per
shape, a first-poll delay F meant to be the QUANTILE (0.8) of their duration:
the first poll then finds 8 tasks in 10 finished, and the others are caught by
gaps of GAP_SHARE x F (at least KLING_POLL_MIN, each KLING_POLL_FACTOR times the
last, at most KLING_POLL_MAX). A task's duration is never seen exactly (the API
answers carry no times), only that it lies between the last poll that saw it
running and the one that saw it finished; but whether the first poll at F found
it finished is one exact fact per job, and it is all F needs:
F <- F x exp(-RATE x (finished - QUANTILE)) moves F up on a miss and down on a
hit and rests where hits are QUANTILE of the jobs (`step`, in log space, where
the updates add up in any order, so each worker's counts merge into the shared
row as sums). The first jobs of a shape, polled on the configured schedule,
seed F with the point QUANTILE of the way through the interval in which each
was seen finishing (`seed`). F stays between KLING_POLL_MIN (lowered to
KLING_POLL_FIRST or KLING_POLL_MAX if either is lower) and KLING_POLL_MAX: no running task goes
unpolled longer than KLING_POLL_MAX, so with the default 30 s a shape whose
tasks take longer still needs two polls or more. The shared row and each
process's copy of it live in worker.polling.learning and models.poll_shapes.

A task not finished KLING_POLL_DEADLINE seconds after submission fails as `timeout`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from worker.config import Settings

# The share of a shape's tasks the learned first poll finds finished. In a simulation of
# bench/polling.py's stream (tasks spread ±15 %), 0.7 cost 0.1 to 0.2 more polls per job than
# 0.8 for results recorded 0.2 to 0.4 s sooner (p50); two separate bench runs agreed.
QUANTILE = 0.8
# How far one job moves F (in log space): a hit shrinks it by 0.6 %, a miss grows it by 2.4 %.
# A job's answer about F comes F seconds or more after F was used, and a shape's jobs go on
# being sent meanwhile: with a shape's jobs arriving every 2.4 s and tasks of 40 s, 0.1 made F
# swing below and above its tasks in turn (runs of 20 first-poll hits, then runs of jobs
# polled 4 to 6 times: 2.9 requests per job after 200 jobs, bench/polling.py). 0.03 keeps the
# swing within the gaps (a simulation of that stream: 1.4 polls per job against 1.8).
RATE = 0.03
# The most one worker's merge (its counts of a few seconds) moves log F, either way: x1.65.
# Without it a burst of jobs of one shape, submitted together and all judged against one
# F, moves F by the sum of hundreds of steps at once (1,000 jobs of 2 s in one burst took
# F to KLING_POLL_MAX, and the last of them 42 s to end).
MAX_STEP = 0.5
# The gaps after a learned first poll, as a share of F: a task that outlasts F
# by less than this is caught by the second poll (tasks of one shape spread ±15 % here).
GAP_SHARE = 0.15


class Shape(NamedTuple):
    """What a task's duration depends on: its resolution, images made (n), and input images."""

    resolution: str
    n: int
    images: int


def shape_of(request: Mapping[str, Any]) -> Shape:
    """The shape of a validated request (the API's defaults for what it leaves out)."""
    images = len(request.get("image_list") or ()) + len(request.get("element_list") or ())
    return Shape(str(request.get("resolution") or "1k"), int(request.get("n") or 1), images)


@dataclass(frozen=True)
class NextPoll:
    """Poll number `seq` of a job, due `delay` seconds from now."""

    seq: int
    delay: float


def lowest(settings: Settings) -> float:
    """The earliest learned first poll and the shortest learned gap."""
    return min(settings.poll_min, settings.poll_first, settings.poll_max)


def bounded(seconds: float, settings: Settings) -> float:
    """A learned first poll kept within the configured bounds."""
    return min(settings.poll_max, max(lowest(settings), seconds))


def gap(polls_done: int, settings: Settings, learned: float | None = None) -> float:
    """Seconds from poll number `polls_done` (0: the submission) to the next.

    `learned`: the first poll learned for the job's shape, None for the configured schedule.
    """
    if learned is None:
        return min(settings.poll_max, settings.poll_first * settings.poll_factor**polls_done)
    if polls_done == 0:
        return bounded(learned, settings)
    later = max(lowest(settings), GAP_SHARE * learned) * settings.poll_factor ** (polls_done - 1)
    return min(settings.poll_max, later)


def first(settings: Settings, learned: float | None = None) -> NextPoll:
    return NextPoll(0, gap(0, settings, learned))


def deadline(submitted_at: datetime, settings: Settings) -> datetime:
    return submitted_at + timedelta(seconds=settings.poll_deadline)


# -- learning F, in log space --------------------------------------------------


def step(hits: Any, misses: Any) -> Any:
    """How much `hits` first polls that found their task finished and `misses` that did not move log F
    (before the MAX_STEP bound, which the merge applies: models.poll_shapes).

    Plain arithmetic, so the same rule applies to numbers here and to columns in
    the shared row's merge.
    """
    return RATE * (QUANTILE * misses - (1 - QUANTILE) * hits)


def seed(running_until: float, finished_by: float) -> float:
    """log F from one job on the configured schedule: last seen running (0: never), then seen finished.

    The point QUANTILE of the way through the interval, as F is meant to be the
    QUANTILE of the durations: the middle started F too low (the first learned
    jobs of a shape then needed 2 or 3 polls each until F rose), and the learned
    polls correct what the seed gets wrong.
    """
    return math.log(max(1e-3, running_until + QUANTILE * (finished_by - running_until)))
