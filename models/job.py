"""The ``jobs`` table: one row per generation job, keyed by the caller's job id."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, Index, Integer, String, Text, TypeDecorator, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class JobStatus(str, enum.Enum):
    queued = "queued"
    submitting = "submitting"
    submitted = "submitted"
    processing = "processing"
    succeeded = "succeeded"
    failed = "failed"
    rejected = "rejected"
    cancelled = "cancelled"


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.rejected, JobStatus.cancelled})
# Submitted to Modellix and not finished: what the tracker polls.
ACTIVE = frozenset({JobStatus.submitted, JobStatus.processing})
# Holding (or about to hold) a place at Modellix: what MODELLIX_MAX_IN_FLIGHT counts.
IN_FLIGHT = ACTIVE | {JobStatus.submitting}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend (SQLite hands back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime: use UTC-aware values")
        return value.astimezone(UTC).replace(tzinfo=None) if dialect.name == "sqlite" and value else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


_ACTIVE_SQL = text("status IN ('submitted', 'processing')")
_QUEUED_SQL = text("status = 'queued'")
# A message's tenant and priority when it names none (worker.schemas.MessageSchema).
DEFAULT_TENANT = "default"
DEFAULT_PRIORITY = 5
JSONDoc = JSON().with_variant(JSONB(), "postgresql")
# For optional documents: Python None is SQL NULL, not JSON null, so `IS NULL` finds it (models.outbox).
OptionalJSONDoc = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued.value)
    modellix_task_id: Mapped[str | None] = mapped_column(String(128), unique=True)
    # The validated request; inline base64 images replaced by digest and size.
    request: Mapped[dict[str, Any]] = mapped_column(JSONDoc)
    # `metadata` is reserved on declarative classes, hence the attribute name.
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONDoc)
    result_urls: Mapped[list[str] | None] = mapped_column(JSONDoc)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Polls made so far; doubles as the claim token that keeps two workers
    # from polling the same job at once (see models.store.claim_poll).
    polls: Mapped[int] = mapped_column(Integer, default=0)
    next_poll_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The raw `data` of the last Modellix answer, for post-mortems.
    last_response: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    submitted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Where the caller wants to hear that the job ended (models.outbox): an http(s) URL,
    # and/or a Celery task {"task": NAME, "queue": QUEUE}.
    webhook: Mapped[str | None] = mapped_column(Text)
    callback: Mapped[dict[str, Any] | None] = mapped_column(OptionalJSONDoc)
    # The archived result images, in the order of result_urls (worker.results.archive).
    files: Mapped[list[dict[str, Any]] | None] = mapped_column(OptionalJSONDoc)
    # The job this one retries (`kling-worker jobs retry`): a new job, with a new id, linked to the failed one.
    retry_of: Mapped[str | None] = mapped_column(String(64))
    # Whose job this is: tenants share the fleet's budget by weight (worker.fleet.share).
    tenant: Mapped[str] = mapped_column(String(64), default=DEFAULT_TENANT, server_default=DEFAULT_TENANT)
    priority: Mapped[int] = mapped_column(Integer, default=DEFAULT_PRIORITY, server_default=str(DEFAULT_PRIORITY))
    # A queued job's place in its tenant's line (lower goes first): the epoch second it was queued,
    # less KLING_PRIORITY_AGING seconds per step of priority (worker.queue.line_of).
    line: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    # A queued job is not taken before this (a retry's delay after a refused or rate-limited try).
    due_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The request as it will be sent, kept only while the job waits and only when it differs from
    # `request` (inline images, which `request` keeps as digests): cleared when the job leaves the line.
    payload: Mapped[dict[str, Any] | None] = mapped_column(OptionalJSONDoc)

    __table_args__ = (
        Index("ix_jobs_status_updated", "status", "updated_at"),
        Index("ix_jobs_created_at", "created_at"),
        # The tracker's query: active jobs whose next poll is due.
        Index("ix_jobs_next_poll", "next_poll_at", postgresql_where=_ACTIVE_SQL, sqlite_where=_ACTIVE_SQL),
        # A job's retries: found before retrying it again, shown by `jobs show`.
        Index("ix_jobs_retry_of", "retry_of"),
        # The line: each tenant's queued jobs in order (worker.queue), and the count of each tenant's.
        Index("ix_jobs_line", "tenant", "line", postgresql_where=_QUEUED_SQL, sqlite_where=_QUEUED_SQL),
        Index("ix_jobs_tenant_status", "tenant", "status"),
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "retry_of": self.retry_of,
            "tenant": self.tenant,
            "priority": self.priority,
            "modellix_task_id": self.modellix_task_id,
            "request": self.request,
            "metadata": self.meta,
            "result_urls": self.result_urls,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "attempts": self.attempts,
            "polls": self.polls,
            "next_poll_at": _iso(self.next_poll_at),
            "last_response": self.last_response,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "submitted_at": _iso(self.submitted_at),
            "finished_at": _iso(self.finished_at),
            "due_at": _iso(self.due_at),
            "webhook": self.webhook,
            "callback": self.callback,
            "files": self.files,
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
