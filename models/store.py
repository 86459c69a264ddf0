"""The job table's SQL: inserts, conditional updates, claims and queries, as Core statements.

Which status may follow which is not decided here but in models.lifecycle,
which calls `update_if` with the statuses its table allows. Each function
takes a Connection or a Session: a single statement (models.db.statement) on
the hot paths, since each is atomic alone, or a transaction where a row lock
must last (the sweeps, the fleet's in-flight count).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, NamedTuple, cast

from sqlalchemy import ClauseElement, Connection, Table, Text, bindparam, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from models.db import Executor
from models.job import ACTIVE, DEFAULT_PRIORITY, DEFAULT_TENANT, Job, JobStatus

jobs = cast(Table, Job.__table__)


def _values(statuses: Iterable[JobStatus]) -> list[str]:
    return [s.value for s in statuses]


def _dialect(ex: Executor) -> str:
    return (ex.dialect if isinstance(ex, Connection) else ex.get_bind().dialect).name


def _insert_for(dialect: str, table: Table = jobs) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT (both PostgreSQL and SQLite do)."""
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def dialect_insert(ex: Executor, table: Table) -> Any:
    """An INSERT into `table` that knows ON CONFLICT, for the executor's database."""
    return _insert_for(_dialect(ex), table)


_NEW_ROW = (
    "id",
    "status",
    "request",
    "metadata",
    "attempts",
    "polls",
    "created_at",
    "updated_at",
    "webhook",
    "callback",
    "retry_of",
    "tenant",
    "priority",
    "line",
    "payload",
)


def _new_row(
    job_id: str, status: JobStatus, request: dict[str, Any], meta: dict[str, Any] | None, now: datetime, **extra: Any
) -> dict[str, Any]:
    return {
        "id": job_id,
        "status": status.value,
        "request": request,
        "metadata": meta,
        "attempts": 0,
        "polls": 0,
        "created_at": now,
        "updated_at": now,
        "webhook": None,
        "callback": None,
        "retry_of": None,
        "tenant": DEFAULT_TENANT,
        "priority": DEFAULT_PRIORITY,
        "line": now.timestamp(),
        "payload": None,
        **extra,
    }


def add_job(
    ex: Executor,
    job_id: str,
    status: JobStatus,
    request: dict[str, Any],
    meta: dict[str, Any] | None,
    now: datetime,
    **extra: Any,
) -> bool:
    """Insert a job unless the id exists; True if this call created it."""
    stmt = _insert_for(_dialect(ex)).values(_new_row(job_id, status, request, meta, now, **extra))
    stmt = stmt.on_conflict_do_nothing(index_elements=[jobs.c.id]).returning(jobs.c.id)
    return ex.execute(stmt).first() is not None


def update_if(
    ex: Executor,
    job_id: str,
    allowed: Iterable[JobStatus],
    now: datetime,
    values: dict[str, Any],
    unchanged_since: datetime | None = None,
) -> bool:
    """Update a job only while its status is one of `allowed` (and, with `unchanged_since`, only if
    the row was last updated at that very time); True if it was updated."""
    allowed_values = tuple(sorted(_values(allowed)))
    if any(isinstance(v, ClauseElement) for v in values.values()) or unchanged_since is not None:
        stmt = update(jobs).where(jobs.c.id == job_id, jobs.c.status.in_(allowed_values))
        if unchanged_since is not None:
            stmt = stmt.where(jobs.c.updated_at == unchanged_since)
        return _one_row(ex.execute(stmt.values(updated_at=now, **values)))
    stmt = _update_stmt(allowed_values, tuple(sorted(values)))
    return _one_row(ex.execute(stmt, {"job_id": job_id, "updated_at": now, **values}))


def _one_row(result: Any) -> bool:
    return bool(result.rowcount == 1)


@lru_cache(maxsize=128)
def _update_stmt(allowed: tuple[str, ...], keys: tuple[str, ...]) -> Any:
    # Built once per shape: constructing and cache-keying an UPDATE costs about
    # as much CPU as running it, on a path every job takes four times.
    return (
        update(jobs)
        .where(jobs.c.id == bindparam("job_id"), jobs.c.status.in_(allowed))
        .values({name: bindparam(name) for name in ("updated_at", *keys)})
    )


_CLAIM_POLL = (
    update(jobs)
    .where(jobs.c.id == bindparam("job_id"), jobs.c.polls == bindparam("seq"), jobs.c.status.in_(_values(ACTIVE)))
    .values(polls=jobs.c.polls + 1, next_poll_at=bindparam("lease_until"), updated_at=bindparam("now"))
    .returning(
        jobs.c.modellix_task_id,
        jobs.c.submitted_at,
        # Not `webhook IS NOT NULL OR …`: SQLite 3.40 answers IS NULL wrongly in RETURNING for
        # columns added by a migration (ALTER TABLE ADD COLUMN) to rows written before it.
        func.coalesce(jobs.c.webhook, jobs.c.callback.cast(Text)).is_not(None).label("notify"),
    )
)


class Taken(NamedTuple):
    """A queued job taken from its tenant's line for a submit (now `submitting`)."""

    job_id: str
    attempt: int
    request: dict[str, Any]  # what to send: the payload if the job has one, else its request
    tenant: str


# Built once (each is run at every turn): building and cache-keying a statement costs about as much
# CPU as running it.
_FIRST_IN_LINE = (
    select(jobs.c.id)
    .where(
        jobs.c.status == JobStatus.queued.value,
        jobs.c.tenant == bindparam("tenant"),
        (jobs.c.due_at.is_(None)) | (jobs.c.due_at <= bindparam("now", type_=jobs.c.due_at.type)),
    )
    .order_by(jobs.c.line)
    .limit(1)
    .with_for_update(skip_locked=True)
)


def first_in_line(ex: Executor, tenant: str, now: datetime) -> str | None:
    """The first due job in `tenant`'s line, locked for the caller's transaction.

    SKIP LOCKED (PostgreSQL) passes over a row another transaction holds; SQLite has one writer at
    a time (BEGIN IMMEDIATE), so needs none.
    """
    return ex.execute(_FIRST_IN_LINE, {"tenant": tenant, "now": now}).scalar_one_or_none()


@lru_cache(maxsize=8)
def _take_stmt(allowed: tuple[str, ...], to: str) -> Any:
    return (
        update(jobs)
        .where(jobs.c.id == bindparam("job_id"), jobs.c.status.in_(allowed))
        .values(status=to, attempts=jobs.c.attempts + 1, due_at=None, updated_at=bindparam("now"))
        .returning(jobs.c.id, jobs.c.attempts, jobs.c.request, jobs.c.payload, jobs.c.tenant)
    )


def take(ex: Executor, job_id: str, allowed: Iterable[JobStatus], to: JobStatus, now: datetime) -> Taken | None:
    """Move a job to `to` (counting an attempt) while its status is one of `allowed`; what to send."""
    stmt = _take_stmt(tuple(sorted(_values(allowed))), to.value)
    row = ex.execute(stmt, {"job_id": job_id, "now": now}).first()
    if row is None:
        return None
    return Taken(row.id, row.attempts, row.payload if row.payload is not None else row.request, row.tenant)


def place_in_line(ex: Executor, tenant: str, line: float) -> int:
    """The place (1 = next) in its tenant's line of a queued job at `line`: due or not, as it stands."""
    ahead = select(func.count()).where(
        jobs.c.status == JobStatus.queued.value, jobs.c.tenant == tenant, jobs.c.line < line
    )
    return int(ex.execute(ahead).scalar_one()) + 1


class PollClaim(NamedTuple):
    task_id: str
    submitted_at: datetime
    notify: bool  # the job has a webhook or a callback: its end has events to send


def claim_poll(ex: Executor, job_id: str, seq: int, now: datetime, lease: float) -> PollClaim | None:
    """Take the right to make poll number `seq` of a job: its task id, submitted_at and `notify` if won.

    `polls` is the token: whoever moves it from seq to seq+1 polls, a stale or
    duplicate message finds it moved and stops. The lease pushes next_poll_at
    ahead so the sweeper re-dispatches only if this poll never reports back.
    """
    params = {"job_id": job_id, "seq": seq, "lease_until": now + timedelta(seconds=lease), "now": now}
    row = ex.execute(_CLAIM_POLL, params).first()
    return PollClaim(row[0], row[1], bool(row[2])) if row else None


def claim_overdue_polls(s: Session, now: datetime, lease: float, limit: int) -> list[tuple[str, int]]:
    """Active jobs whose poll is overdue (its message lost or its worker gone).

    SKIP LOCKED lets several sweepers run at once without taking the same rows.
    Needs a transaction (a Session), as the lock must last until the update.
    """
    rows = s.execute(
        select(jobs.c.id, jobs.c.polls)
        .where(jobs.c.status.in_(_values(ACTIVE)), jobs.c.next_poll_at <= now)
        .order_by(jobs.c.next_poll_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    if rows:
        s.execute(
            update(jobs).where(jobs.c.id.in_([r[0] for r in rows])).values(next_poll_at=now + timedelta(seconds=lease))
        )
    return [(r[0], r[1]) for r in rows]


def claim_stale(s: Session, status: JobStatus, before: datetime, limit: int) -> list[str]:
    """Jobs in `status` not updated since `before`, locked for the caller's transaction."""
    return list(
        s.execute(
            select(jobs.c.id)
            .where(jobs.c.status == status.value, jobs.c.updated_at < before)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).scalars()
    )


def set_files(ex: Executor, job_id: str, files: list[dict[str, Any]], now: datetime) -> None:
    """Record where a job's result images were archived (in the order of its result URLs).

    Not a status change: a job that ended keeps its status; its files are what followed the end.
    """
    ex.execute(_SET_FILES, {"job_id": job_id, "files": files, "now": now})


# Built once (every archived job passes here); `files` takes the column's JSON type from the column.
_SET_FILES = (
    update(jobs)
    .where(jobs.c.id == bindparam("job_id"))
    .values(files=bindparam("files", type_=jobs.c.files.type), updated_at=bindparam("now"))
)


def count_by_status(ex: Executor) -> dict[str, int]:
    return {status: count for status, count in ex.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status))}


def count_by_tenant(ex: Executor) -> dict[str, dict[str, int]]:
    """Jobs per tenant and status, tenants by name."""
    counts: dict[str, dict[str, int]] = {}
    query = select(jobs.c.tenant, jobs.c.status, func.count()).group_by(jobs.c.tenant, jobs.c.status)
    for tenant, status, n in ex.execute(query.order_by(jobs.c.tenant)):
        counts.setdefault(tenant, {})[status] = n
    return counts


def get_job(s: Session, job_id: str) -> Job | None:
    return s.get(Job, job_id)


def find_jobs(s: Session, ids: list[str]) -> list[Job]:
    return list(s.scalars(select(Job).where(Job.id.in_(ids))))


def list_jobs(
    s: Session,
    status: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    error_code: str | None = None,
) -> list[Job]:
    query = select(Job).order_by(Job.created_at.desc()).limit(limit)
    if status:
        query = query.where(Job.status == status)
    if error_code:
        query = query.where(Job.error_code == error_code)
    if since:
        query = query.where(Job.created_at >= since)
    if until:
        query = query.where(Job.created_at < until)
    return list(s.scalars(query))


def retries_of(s: Session, ids: Iterable[str]) -> dict[str, list[str]]:
    """The jobs that retry each of `ids` (their `retry_of`), oldest first; ids with none are left out."""
    found: dict[str, list[str]] = {}
    query = select(jobs.c.retry_of, jobs.c.id).where(jobs.c.retry_of.in_(list(ids))).order_by(jobs.c.created_at)
    for original, retry in s.execute(query):
        found.setdefault(original, []).append(retry)
    return found


def existing_ids(s: Session, ids: Iterable[str]) -> set[str]:
    """Which of `ids` are jobs."""
    return set(s.scalars(select(jobs.c.id).where(jobs.c.id.in_(list(ids)))))
