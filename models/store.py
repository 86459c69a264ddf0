"""The job table's writes and claims, as single statements where it matters.

Every state change is a conditional UPDATE (`WHERE status IN ...`), so two
workers racing on one job cannot both win, and terminal states never change.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from models.job import ACTIVE, Job, JobStatus

_NO_SYNC = {"synchronize_session": False}


def _insert(s: Session):  # type: ignore[no-untyped-def]
    return (postgresql.insert if s.get_bind().dialect.name == "postgresql" else sqlite.insert)(Job)


def _new_row(job_id: str, status: JobStatus, request: dict[str, Any], meta: dict[str, Any] | None,
             now: datetime, **extra: Any) -> dict[str, Any]:
    return {"id": job_id, "status": status.value, "request": request, "meta": meta, "attempts": 0,
            "polls": 0, "created_at": now, "updated_at": now, **extra}


def claim_for_submit(s: Session, job_id: str, request: dict[str, Any], meta: dict[str, Any] | None,
                     now: datetime) -> int | None:
    """Create the job as `submitting`, or take over a `queued` one, in one round trip.

    Returns the attempt number. None means another delivery owns it or already submitted it: the caller
    must not submit (this is the duplicate-submission guard).
    """
    row = _new_row(job_id, JobStatus.submitting, request, meta, now, attempts=1)
    stmt = _insert(s).values(row)
    stmt = stmt.on_conflict_do_update(
        index_elements=[Job.id],
        set_={"status": JobStatus.submitting.value, "attempts": Job.attempts + 1, "updated_at": now},
        where=Job.status == JobStatus.queued.value,
    ).returning(Job.attempts)
    row = s.execute(stmt).first()
    return row[0] if row else None


def add_job(s: Session, job_id: str, status: JobStatus, request: dict[str, Any],
            meta: dict[str, Any] | None, now: datetime, **extra: Any) -> bool:
    """Insert a job unless the id exists; True if this call created it."""
    stmt = _insert(s).values(_new_row(job_id, status, request, meta, now, **extra))
    stmt = stmt.on_conflict_do_nothing(index_elements=[Job.id]).returning(Job.id)
    return s.execute(stmt).first() is not None


def transition(s: Session, job_id: str, allowed: set[JobStatus] | frozenset[JobStatus],
               now: datetime, **values: Any) -> bool:
    """Move a job on only if it is in one of `allowed`; True if it moved."""
    stmt = (update(Job).where(Job.id == job_id, Job.status.in_([a.value for a in allowed]))
            .values(updated_at=now, **values).execution_options(**_NO_SYNC))
    return s.execute(stmt).rowcount == 1


def claim_poll(s: Session, job_id: str, seq: int, now: datetime,
               lease: float) -> tuple[str, datetime] | None:
    """Take the right to make poll number `seq` of a job: (task id, submitted_at) if won.

    `polls` is the token: whoever moves it from seq to seq+1 polls, a stale or
    duplicate message finds it moved and stops. The lease pushes next_poll_at
    ahead so the sweeper re-dispatches only if this poll never reports back.
    """
    stmt = (update(Job)
            .where(Job.id == job_id, Job.polls == seq, Job.status.in_([a.value for a in ACTIVE]))
            .values(polls=Job.polls + 1, next_poll_at=now + timedelta(seconds=lease), updated_at=now)
            .returning(Job.modellix_task_id, Job.submitted_at).execution_options(**_NO_SYNC))
    row = s.execute(stmt).first()
    return (row[0], row[1]) if row else None


def claim_overdue_polls(s: Session, now: datetime, lease: float, limit: int) -> list[tuple[str, int]]:
    """Active jobs whose poll is overdue (its message lost or its worker gone).

    SKIP LOCKED lets several sweepers run at once without taking the same rows.
    """
    rows = s.execute(
        select(Job.id, Job.polls)
        .where(Job.status.in_([a.value for a in ACTIVE]), Job.next_poll_at <= now)
        .order_by(Job.next_poll_at).limit(limit).with_for_update(skip_locked=True)
    ).all()
    if rows:
        s.execute(update(Job).where(Job.id.in_([r[0] for r in rows]))
                  .values(next_poll_at=now + timedelta(seconds=lease)).execution_options(**_NO_SYNC))
    return [(r[0], r[1]) for r in rows]


def claim_stale(s: Session, status: JobStatus, before: datetime, limit: int) -> list[str]:
    rows = s.execute(
        select(Job.id).where(Job.status == status.value, Job.updated_at < before)
        .limit(limit).with_for_update(skip_locked=True)
    ).scalars().all()
    return list(rows)


def count_by_status(s: Session) -> dict[str, int]:
    return dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())  # type: ignore[arg-type]


def list_jobs(s: Session, status: str | None = None, since: datetime | None = None,
              until: datetime | None = None, limit: int = 50) -> list[Job]:
    query = select(Job).order_by(Job.created_at.desc()).limit(limit)
    if status:
        query = query.where(Job.status == status)
    if since:
        query = query.where(Job.created_at >= since)
    if until:
        query = query.where(Job.created_at < until)
    return list(s.scalars(query))
