"""Retention: deleting ended jobs with their outbox rows (`kling-worker jobs prune`).

A job may go once it has ended (a terminal status) and its last change
(`updated_at`: its end, or the archive of its images that follows) is before
the cutoff, and none of its deliveries is still to be made: a job whose
webhook is still being retried keeps its row until that is done or given up.
Deletes go in batches, each its own short transaction holding a batch of jobs
together with their deliveries, so a large table is never locked for long.
Archived images are not touched: they live in the archive, not in the database.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, delete, exists, func, select

from models.db import Executor
from models.job import TERMINAL, JobStatus
from models.outbox import State, deliveries
from models.store import jobs

BATCH = 500

_UNSETTLED = (State.waiting.value, State.pending.value)


@dataclass
class Pruned:
    """What a prune deleted (or, in a dry run, would delete)."""

    jobs: dict[str, int] = field(default_factory=dict)  # by status
    deliveries: int = 0
    # Old enough and ended, but with a delivery still to be made: kept.
    kept: int = 0

    @property
    def total(self) -> int:
        return sum(self.jobs.values())

    def add(self, other: Pruned) -> None:
        for status, count in other.jobs.items():
            self.jobs[status] = self.jobs.get(status, 0) + count
        self.deliveries += other.deliveries
        self.kept += other.kept


def _statuses(statuses: Iterable[JobStatus]) -> list[str]:
    chosen = [JobStatus(s) for s in statuses] or list(TERMINAL)
    active = [s.value for s in chosen if s not in TERMINAL]
    if active:
        raise ValueError(f"only ended jobs can be pruned, not {', '.join(sorted(active))}")
    return sorted(s.value for s in chosen)


def _ended_before(cutoff: datetime, statuses: list[str]) -> list[ColumnElement[bool]]:
    return [jobs.c.status.in_(statuses), jobs.c.updated_at < cutoff]


def _settled() -> ColumnElement[bool]:
    unsettled = select(deliveries.c.id).where(deliveries.c.job_id == jobs.c.id, deliveries.c.state.in_(_UNSETTLED))
    return ~exists(unsettled)


def count(ex: Executor, cutoff: datetime, statuses: Iterable[JobStatus] = ()) -> Pruned:
    """What `prune` would delete now (the dry run)."""
    chosen = _statuses(statuses)
    where = [*_ended_before(cutoff, chosen), _settled()]
    by_status = ex.execute(select(jobs.c.status, func.count()).where(*where).group_by(jobs.c.status))
    found = Pruned(jobs={status: int(n) for status, n in by_status})
    doomed = select(jobs.c.id).where(*where)
    found.deliveries = int(ex.execute(select(func.count()).where(deliveries.c.job_id.in_(doomed))).scalar_one())
    found.kept = _kept(ex, chosen, cutoff)
    return found


def _kept(ex: Executor, statuses: list[str], cutoff: datetime) -> int:
    held = select(func.count()).select_from(jobs).where(*_ended_before(cutoff, statuses), ~_settled())
    return int(ex.execute(held).scalar_one())


def prune_batch(ex: Executor, cutoff: datetime, statuses: Iterable[JobStatus] = (), limit: int = BATCH) -> Pruned:
    """Delete up to `limit` prunable jobs and their deliveries, in the caller's transaction.

    The DELETE repeats the conditions, so a job that changed since it was chosen (a delivery made due
    again by `jobs redeliver`) stays; its deliveries go only with it.
    """
    chosen = _statuses(statuses)
    where = [*_ended_before(cutoff, chosen), _settled()]
    ids = list(ex.scalars(select(jobs.c.id).where(*where).order_by(jobs.c.updated_at).limit(limit)))
    if not ids:
        return Pruned()
    gone = ex.execute(delete(jobs).where(jobs.c.id.in_(ids), *where).returning(jobs.c.id, jobs.c.status)).all()
    found = Pruned()
    for _, status in gone:
        found.jobs[status] = found.jobs.get(status, 0) + 1
    if gone:
        result: Any = ex.execute(delete(deliveries).where(deliveries.c.job_id.in_([row[0] for row in gone])))
        found.deliveries = int(result.rowcount)
    return found


def kept(ex: Executor, cutoff: datetime, statuses: Iterable[JobStatus] = ()) -> int:
    """Ended jobs older than the cutoff that a prune keeps because a delivery is still to be made."""
    return _kept(ex, _statuses(statuses), cutoff)
