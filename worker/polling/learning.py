"""This process's part in learning each request shape's first poll (the rule: worker.polling.schedule).

The hot path touches memory only. A submit asks `first_poll` (a dict lookup in
this process's copy of the shared rows, models.poll_shapes); each poll's answer
is counted per shape (`answered`). Every SYNC_EVERY seconds, or sooner once
SYNC_AFTER observations have piled up, the thread that notices merges the
counts into the shared table in one statement and reads the table back in
another; the other threads go on with the copy they have.

What is lost, and what falls back: a worker that stops merges what it counted
(`flush`, from worker.wiring.tasks); one that is killed loses at most SYNC_EVERY
seconds of counts, which only slows the learning. A shape without a row, a
database without the table (a worker newer than its migrations), an outage, or
KLING_POLL_LEARN=false: the configured schedule. A job polled by another
worker than the one that submitted it (after a restart) is followed on the
configured gaps and teaches nothing.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from models import poll_shapes
from models.job import utcnow
from worker.polling import schedule
from worker.polling.schedule import Shape

if TYPE_CHECKING:
    from worker.resources import Resources

log = logging.getLogger("kling_worker.learning")

SYNC_EVERY = 5.0
SYNC_AFTER = 500
# Jobs followed at once whose shape this process remembers; past it, a job gets its learned
# first poll but the configured gaps after it, and teaches nothing.
TRACKS_KEPT = 100_000


@dataclass
class _Track:
    shape: Shape
    learned: float | None  # the learned first poll it was given; None: the configured schedule
    running_until: float = 0.0  # seconds after submission of the last poll that saw it running
    missed: bool = False  # its first poll (on time or late) found it running


@dataclass
class _Counts:
    hits: int = 0
    misses: int = 0
    seeded: int = 0
    seed_sum: float = 0.0  # of schedule.seed values
    used: float = 0.0  # log of the last learned first poll used (a seed if the row is gone)

    def add(self, other: _Counts) -> None:
        self.hits += other.hits
        self.misses += other.misses
        self.seeded += other.seeded
        self.seed_sum += other.seed_sum
        self.used = other.used or self.used


class Learner:
    """This process's copy of the shared rows and its counts since the last merge (one per process:
    Resources.learner)."""

    def __init__(self, res: Resources) -> None:
        self._res = res
        self._lock = threading.Lock()
        self._syncing = threading.Lock()
        self._known: dict[Shape, float] = {}  # log F per shape, as last read
        self._counts: dict[Shape, _Counts] = {}
        self._pending = 0
        self._tracks: dict[str, _Track] = {}
        self._synced = float("-inf")
        self._failing = False

    # -- the hot path ----------------------------------------------------
    def first_poll(self, job_id: str, request: dict[str, Any]) -> schedule.NextPoll:
        cfg = self._res.settings
        self._sync_if_due()
        shape = schedule.shape_of(request)
        log_first = self._known.get(shape)
        learned = schedule.bounded(math.exp(log_first), cfg) if log_first is not None else None
        if len(self._tracks) < TRACKS_KEPT:
            self._tracks[job_id] = _Track(shape, learned)
        return schedule.first(cfg, learned)

    def learned(self, job_id: str) -> float | None:
        track = self._tracks.get(job_id)
        return track.learned if track else None

    def answered(self, job_id: str, seq: int, elapsed: float, finished: bool) -> None:
        """Poll number `seq`, `elapsed` seconds after submission, found the task finished or not."""
        track = self._tracks.pop(job_id, None) if finished else self._tracks.get(job_id)
        if track is None:
            return
        if not finished:
            track.running_until = elapsed
        cfg = self._res.settings
        with self._lock:
            counts = self._counts.setdefault(track.shape, _Counts())
            if track.learned is not None:
                # A first poll that finds the task running is a miss however late it ran (the task
                # outlasted F); one that finds it finished says so about F only if made on time (a
                # late poll on a loaded machine finds more tasks finished than F would have).
                on_time = seq == 0 and elapsed <= track.learned + schedule.lowest(cfg)
                if seq == 0 and not finished:
                    track.missed = True
                elif (on_time and finished) or (finished and track.missed):
                    # A miss is judged at the task's end against F as it is now, not as it was at
                    # the submit: misses of jobs sent before F rose would push it up again and again
                    # (a shape's jobs go on being sent while the first ones run), far past its tasks.
                    now = self._known.get(track.shape)
                    current = schedule.bounded(math.exp(now), cfg) if now is not None else track.learned
                    if not track.missed or elapsed <= current:
                        counts.hits += 1
                    else:
                        counts.misses += 1
                    counts.used = math.log(track.learned)
                    self._pending += 1
            elif finished:
                counts.seeded += 1
                counts.seed_sum += schedule.seed(track.running_until, elapsed)
                self._pending += 1
        if self._pending >= SYNC_AFTER:
            self._sync_if_due()

    def forget(self, job_id: str) -> None:
        self._tracks.pop(job_id, None)

    # -- the shared table --------------------------------------------------
    def _sync_if_due(self) -> None:
        if time.monotonic() - self._synced < SYNC_EVERY and self._pending < SYNC_AFTER:
            return
        if self._syncing.acquire(blocking=False):
            try:
                self.sync()
            finally:
                self._syncing.release()

    def sync(self) -> None:
        """Merge the counts into the shared table, then read it back."""
        self._synced = time.monotonic()
        with self._lock:
            counts, self._counts, self._pending = self._counts, {}, 0
        if counts and not self._merge(counts):
            with self._lock:  # kept for the next merge: per shape, so bounded
                for shape, c in counts.items():
                    self._counts.setdefault(shape, _Counts()).add(c)
        try:
            with self._res.statement() as ex:
                known = poll_shapes.read(ex)
        except SQLAlchemyError as exc:
            self._failed(exc)
            return
        self._known = {Shape(*key): value for key, value in known.items()}
        self._failing = False

    def _merge(self, counts: dict[Shape, _Counts]) -> bool:
        cfg = self._res.settings
        seen = [
            poll_shapes.Seen(
                tuple(shape),  # type: ignore[arg-type]  # a Shape is a (str, int, int)
                c.seed_sum / c.seeded if c.seeded else c.used,
                c.seeded,
                c.hits,
                c.misses,
            )
            for shape, c in counts.items()
            if c.seeded or c.hits or c.misses
        ]
        low, high = math.log(schedule.lowest(cfg)), math.log(cfg.poll_max)
        try:
            with self._res.statement() as ex:
                poll_shapes.merge(ex, seen, schedule.step, schedule.MAX_STEP, low, high, utcnow())
        except SQLAlchemyError as exc:
            self._failed(exc)
            return False
        return True

    def _failed(self, exc: SQLAlchemyError) -> None:
        # Advisory data: the jobs go on with the configured schedule or the last copy read.
        level = logging.DEBUG if self._failing else logging.WARNING
        self._failing = True
        log.log(
            level,
            "the learned poll schedule could not be read or written (%s); polling as configured meanwhile",
            type(exc).__name__,
            extra={"event": "poll_learning_failed"},
        )


def first_poll(res: Resources, job_id: str, request: dict[str, Any]) -> schedule.NextPoll:
    """The first poll of a job just submitted: learned for its shape, else configured."""
    cfg = res.settings
    if not cfg.poll_learn:
        return schedule.first(cfg)
    try:
        return res.learner.first_poll(job_id, request)
    except Exception:
        # Called once the task exists: a fault here must not keep its id from the job row.
        log.exception(
            "job %s: no learned first poll; polling as configured", job_id, extra={"event": "poll_learning_failed"}
        )
        return schedule.first(cfg)


def learned(res: Resources, job_id: str) -> float | None:
    """The learned first poll this process gave the job (its later gaps follow from it), if any."""
    found = res.learner_if_made
    return found.learned(job_id) if found is not None else None


def answered(res: Resources, job_id: str, seq: int, elapsed: float, finished: bool) -> None:
    found = res.learner_if_made
    if found is not None:
        found.answered(job_id, seq, elapsed, finished)


def forget(res: Resources, job_id: str) -> None:
    found = res.learner_if_made
    if found is not None:
        found.forget(job_id)


def flush(res: Resources) -> None:
    """Merge what this process counted (a worker that stops)."""
    found = res.learner_if_made
    if found is not None:
        found.sync()
