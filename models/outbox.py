"""The outbox: what must follow a job's end, recorded in the same transaction as the end itself.

When a job reaches a terminal status (models.lifecycle.move and create), one
row per channel is added here: `archive` for a job that succeeded (its result
images are kept before the URLs expire), and `webhook` and `callback` when the
job's message asked for them. A worker killed right after a job ended leaves
the rows behind, and any other worker sends them (worker.results.delivery). Events
wait for the archive, so a receiver can fetch the files at once.

    pending ─▶ (claimed: due_at pushed ahead by a lease) ─▶ done
       ▲  │                                                ─▶ failed (given up)
       └──┘ retried later (due_at = the next attempt)
    waiting ─▶ pending   (an event, once the job's archive row is settled)

The worker that ends a job usually archives its images first (worker.results.delivery):
the archive row is then written already settled (or pending for a later try),
with one attempt counted, and the events pending at once (`Archived`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from functools import lru_cache
from typing import Any, cast

from sqlalchemy import (
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    case,
    func,
    insert,
    literal,
    null,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.orm import Mapped, Session, mapped_column

from models.db import Executor
from models.job import Base, JobStatus, UTCDateTime, utcnow
from models.store import jobs


class Channel(str, Enum):
    archive = "archive"
    webhook = "webhook"
    callback = "callback"


class State(str, Enum):
    waiting = "waiting"  # an event whose job's archive is not settled yet
    pending = "pending"  # due at due_at (also while a worker holds it, with due_at pushed ahead)
    done = "done"
    failed = "failed"  # given up; `kling-worker jobs redeliver` sends it again


_PENDING_SQL = text("state = 'pending'")
_UNSETTLED_SQL = text("state IN ('waiting', 'pending')")


class Delivery(Base):
    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    due_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    done_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        UniqueConstraint("job_id", "channel", name="uq_deliveries_job_channel"),
        Index("ix_deliveries_due", "due_at", postgresql_where=_PENDING_SQL, sqlite_where=_PENDING_SQL),
        Index("ix_deliveries_job", "job_id"),
        # The backlog (read at every metrics scrape) stays small while the history grows.
        Index("ix_deliveries_unsettled", "state", postgresql_where=_UNSETTLED_SQL, sqlite_where=_UNSETTLED_SQL),
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "state": self.state,
            "attempts": self.attempts,
            "due_at": self.due_at.isoformat() if self.due_at else None,
            "last_error": self.last_error,
            "done_at": self.done_at.isoformat() if self.done_at else None,
        }


deliveries = cast(Table, Delivery.__table__)


@dataclass(frozen=True)
class Archived:
    """A job's images archived by the worker that ended it, before it wrote the end: its archive
    row is then written as it stands (settled, or pending with `due_at` for the next try) with
    one attempt made, and the job's events are due at once if it is settled."""

    state: State
    due_at: datetime | None = None  # the next try, for a pending row
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "due_at": self.due_at.isoformat() if self.due_at else None,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Archived:
        due = data.get("due_at")
        return cls(State(data["state"]), datetime.fromisoformat(due) if due else None, data.get("error"))

    @property
    def settled(self) -> bool:
        return self.state in (State.done, State.failed)


def add_for(ex: Executor, job_id: str, status: JobStatus, now: datetime, archived: Archived | None = None) -> None:
    """Within the transaction that ended the job: one row per channel that must follow its end.

    One statement, whatever the job asked for: the job's own row says whether it has a
    webhook or a callback. A job that succeeded gets its archive row as `archived` says,
    or pending now (some worker archives it next); its events wait until that row is settled.
    """
    if status is not JobStatus.succeeded:
        ex.execute(_add_stmt(False), {"job_id": job_id, "now": now})
        return
    if archived is None:
        archive = {"archive_state": State.pending.value, "archive_tries": 0, "archive_due": now, "archive_error": None}
    else:
        archive = {
            "archive_state": archived.state.value,
            "archive_tries": 1,
            "archive_due": archived.due_at,
            "archive_error": archived.error,
        }
    settled = archived is not None and archived.settled
    events = {"event_state": (State.pending if settled else State.waiting).value, "event_due": now if settled else None}
    ex.execute(_add_stmt(True), {"job_id": job_id, "now": now, "done_at": now if settled else None} | archive | events)


@lru_cache(maxsize=2)
def _add_stmt(succeeded: bool) -> Any:
    """INSERT … SELECT of the rows a job's end needs, built once per kind of end (the statement
    is then compiled once and cached by SQLAlchemy, instead of once per job)."""
    now = bindparam("now", type_=UTCDateTime)
    no_time = null().cast(UTCDateTime)
    # A job that succeeded has its images archived first; its events wait for that (add_for).
    event_state = bindparam("event_state", type_=String) if succeeded else literal(State.pending.value)
    event_due = bindparam("event_due", type_=UTCDateTime) if succeeded else now
    wanted = [(Channel.webhook, jobs.c.webhook.is_not(None)), (Channel.callback, jobs.c.callback.is_not(None))]
    rows = [
        select(
            jobs.c.id,
            literal(channel.value),
            event_state,
            literal(0),
            event_due,
            null().cast(Text),
            no_time,
            now,
            now,
        ).where(jobs.c.id == bindparam("job_id"), condition)
        for channel, condition in wanted
    ]
    if succeeded:
        rows.insert(
            0,
            select(
                jobs.c.id,
                literal(Channel.archive.value),
                bindparam("archive_state", type_=String),
                bindparam("archive_tries", type_=Integer),
                bindparam("archive_due", type_=UTCDateTime),
                bindparam("archive_error", type_=Text),
                bindparam("done_at", type_=UTCDateTime),
                now,
                now,
            ).where(jobs.c.id == bindparam("job_id")),
        )
    columns = ["job_id", "channel", "state", "attempts", "due_at", "last_error", "done_at", "created_at", "updated_at"]
    return insert(deliveries).from_select(columns, union_all(*rows))


def claim_due(s: Session, now: datetime, lease: float, limit: int) -> list[tuple[int, str, str]]:
    """Pending rows that are due, taken for `lease` seconds: (id, job id, channel).

    SKIP LOCKED lets several sweepers run at once without taking the same rows.
    """
    rows = s.execute(
        select(deliveries.c.id, deliveries.c.job_id, deliveries.c.channel)
        .where(deliveries.c.state == State.pending.value, deliveries.c.due_at <= now)
        .order_by(deliveries.c.due_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    if rows:
        s.execute(
            update(deliveries)
            .where(deliveries.c.id.in_([r[0] for r in rows]))
            .values(due_at=now + timedelta(seconds=lease), attempts=deliveries.c.attempts + 1, updated_at=now)
        )
    return [(r[0], r[1], r[2]) for r in rows]


def settle(ex: Executor, delivery_id: int, now: datetime, state: State, error: str | None = None) -> None:
    """A delivery is done, or failed for good."""
    ex.execute(_SETTLE, {"delivery_id": delivery_id, "state": state.value, "error": error, "now": now})


# Built once: settling is on every job's path, and a statement built per call costs its cache key.
_SETTLE = (
    update(deliveries)
    .where(deliveries.c.id == bindparam("delivery_id"))
    .values(
        state=bindparam("state"),
        due_at=None,
        last_error=bindparam("error"),
        updated_at=bindparam("now"),
        done_at=bindparam("now"),
    )
)


def retry_at(ex: Executor, delivery_id: int, now: datetime, due_at: datetime, error: str) -> None:
    ex.execute(
        update(deliveries)
        .where(deliveries.c.id == delivery_id, deliveries.c.state == State.pending.value)
        .values(due_at=due_at, last_error=error, updated_at=now)
    )


def release_events(ex: Executor, job_id: str, now: datetime) -> None:
    """The job's archive is settled: its events are due now."""
    ex.execute(
        update(deliveries)
        .where(deliveries.c.job_id == job_id, deliveries.c.state == State.waiting.value)
        .values(state=State.pending.value, due_at=now, updated_at=now)
    )


def claim_job_due(ex: Executor, job_id: str, now: datetime, lease: float) -> list[int]:
    """A job's rows that are due now, taken for `lease` seconds (by the worker that just released them)."""
    params = {"of_job": job_id, "now": now, "lease_until": now + timedelta(seconds=lease)}
    return [row[0] for row in ex.execute(_CLAIM_JOB_DUE, params)]


# Built once: every archived job passes here, and building the statement per call cost
# more CPU than running it (models/store.py says the same of its updates).
_CLAIM_JOB_DUE = (
    update(deliveries)
    .where(
        deliveries.c.job_id == bindparam("of_job"),
        deliveries.c.state == State.pending.value,
        deliveries.c.due_at <= bindparam("now"),
    )
    .values(due_at=bindparam("lease_until"), attempts=deliveries.c.attempts + 1, updated_at=bindparam("now"))
    .returning(deliveries.c.id)
)


def again(ex: Executor, job_id: str, channels: list[Channel], now: datetime) -> int:
    """Send a job's events again (an operator's redeliver): those rows are due now; how many."""
    result = ex.execute(
        update(deliveries)
        .where(
            deliveries.c.job_id == job_id,
            deliveries.c.channel.in_([c.value for c in channels]),
            deliveries.c.state.in_([State.done.value, State.failed.value]),
        )
        .values(state=State.pending.value, due_at=now, attempts=0, last_error=None, done_at=None, updated_at=now)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]  # an UPDATE's CursorResult


@dataclass(frozen=True)
class Backlog:
    """The rows of one channel in one unsettled state (waiting or pending)."""

    channel: str
    state: str
    rows: int
    due: int  # pending rows whose time has come and that no worker holds: waiting for the sweep
    oldest_due: datetime | None  # the due_at of the longest-waiting of those


def backlog(ex: Executor, now: datetime) -> list[Backlog]:
    """What is left to deliver, by channel and state (settled rows are not counted)."""
    due = (deliveries.c.state == State.pending.value) & (deliveries.c.due_at <= now)
    rows = ex.execute(
        select(
            deliveries.c.channel,
            deliveries.c.state,
            func.count(),
            func.coalesce(func.sum(case((due, 1), else_=0)), 0),
            func.min(case((due, deliveries.c.due_at))),
        )
        .where(deliveries.c.state.in_([State.waiting.value, State.pending.value]))
        .group_by(deliveries.c.channel, deliveries.c.state)
    )
    return [Backlog(r[0], r[1], int(r[2]), int(r[3]), r[4]) for r in rows]


def for_job(s: Session, job_id: str) -> list[Delivery]:
    return list(s.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id)))


# A delivery row with what carrying it out needs of its job: not the job's request or last answer,
# the two large documents, which neither an archive nor an event reads.
_WITH_JOB = (
    select(
        deliveries.c.channel,
        deliveries.c.state,
        deliveries.c.attempts,
        deliveries.c.created_at.label("row_created_at"),
        jobs.c.id,
        jobs.c.status,
        jobs.c.tenant,
        jobs.c.modellix_task_id,
        jobs.c.result_urls,
        jobs.c.files,
        jobs.c.error_code,
        jobs.c.error_message,
        jobs.c["metadata"].label("meta"),
        jobs.c.created_at,
        jobs.c.finished_at,
        jobs.c.webhook,
        jobs.c.callback,
    )
    .join(jobs, jobs.c.id == deliveries.c.job_id)
    .where(deliveries.c.id == bindparam("delivery_id"))
)


def with_job(ex: Executor, delivery_id: int) -> Row[Any] | None:
    """A delivery and its job's columns named as on models.job.Job (`meta` for the metadata), in one read."""
    return cast("Row[Any] | None", ex.execute(_WITH_JOB, {"delivery_id": delivery_id}).first())


def get(s: Session, delivery_id: int) -> Delivery | None:
    return s.get(Delivery, delivery_id)
