"""The job lifecycle: which status may follow which, and the verbs that move a job.

Every status change in kling-worker goes through `move` (the verbs below are
named calls of it), as one conditional UPDATE: a job moves only from a status
the table allows, so two workers racing on one job cannot both win, a stale
or duplicate message changes nothing, and terminal states never change.
A move to a terminal status is where a job ends: `finished_at` is set there,
and in the same transaction the outbox rows that must follow the end
(models.outbox: archive the images, send the events), once.

    (new) ─▶ queued ─▶ submitting ─▶ submitted ─▶ processing ─▶ succeeded
      │        │  ▲        │  │          │             │
      │        │  └requeue─┘  └──────────┴─────────────┴─────▶ failed
      │        └─▶ cancelled
      ├─▶ submitting (claimed at once)
      ├─▶ rejected (never sent)
      └─▶ cancelled (by an operator, before any worker took the message)
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from models import outbox, store
from models.db import Executor
from models.job import ACTIVE, TERMINAL, JobStatus

S = JobStatus
# status -> the statuses that may follow it. A status listed after itself may
# be updated in place (an active job's next poll, its last answer).
NEXT: dict[JobStatus, frozenset[JobStatus]] = {
    S.queued: frozenset({S.submitting, S.cancelled}),
    S.submitting: frozenset({S.queued, S.submitted, S.failed}),
    S.submitted: frozenset({S.submitted, S.processing, S.succeeded, S.failed}),
    S.processing: frozenset({S.processing, S.succeeded, S.failed}),
    **{terminal: frozenset() for terminal in TERMINAL},
}
# Statuses whose row may change without a status change (S -> S in the table).
IN_PLACE = frozenset(s for s, following in NEXT.items() if s in following)
# The statuses a job may be created in: a worker sees its message for the first time, or
# an operator cancels a job whose message no worker has taken yet.
CREATED_AS = frozenset({S.queued, S.submitting, S.rejected, S.cancelled})
# target -> the statuses it may be reached from.
SOURCES: dict[JobStatus, frozenset[JobStatus]] = {
    to: frozenset(s for s, following in NEXT.items() if to in following) for to in JobStatus
}


def move(
    ex: Executor,
    job_id: str,
    to: JobStatus,
    now: datetime,
    *,
    only_from: Iterable[JobStatus] = (),
    unchanged_since: datetime | None = None,
    archived: outbox.Archived | None = None,
    **values: Any,
) -> bool:
    """Move a job to `to` if the table allows it from the job's current status; True if it moved.

    `only_from` narrows the allowed statuses to those the caller expects (a
    submit step fails only a job it is submitting, never one a sweep has moved on);
    `unchanged_since` moves it only if nothing changed the row since that time;
    `archived`: a job that succeeded had its images archived already (models.outbox.add_for).
    """
    allowed = SOURCES[to] & frozenset(only_from) if only_from else SOURCES[to]
    if only_from and not frozenset(only_from) <= SOURCES[to]:
        raise ValueError(f"{to.value} cannot follow {sorted(s.value for s in set(only_from) - SOURCES[to])}")
    if to in TERMINAL:
        _require_transaction(ex)
        values.setdefault("finished_at", now)
        values["next_poll_at"] = None
        values["payload"] = None
    moved = store.update_if(ex, job_id, allowed, now, {"status": to.value, **values}, unchanged_since)
    if moved and to in TERMINAL:
        outbox.add_for(ex, job_id, to, now, archived)
    return moved


def _require_transaction(ex: Executor) -> None:
    # The outbox rows must commit with the end, or a crash between the two loses the caller's event.
    if isinstance(ex, Connection) and ex.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        raise ValueError("a job's end must be written in a transaction (models.db.transaction), with its outbox rows")


def create(
    ex: Executor,
    job_id: str,
    status: JobStatus,
    request: dict[str, Any],
    meta: dict[str, Any] | None,
    now: datetime,
    **values: Any,
) -> bool:
    """Record a job not seen before; True if created (False: the id exists and keeps its row)."""
    if status not in CREATED_AS:
        raise ValueError(f"a job cannot start as {status.value}")
    if status in TERMINAL:
        _require_transaction(ex)
        values.setdefault("finished_at", now)
    created = store.add_job(ex, job_id, status, request, meta, now, **values)
    if created and status in TERMINAL:
        outbox.add_for(ex, job_id, status, now)
    return created


# -- the verbs ---------------------------------------------------------------


def take(ex: Executor, job_id: str, now: datetime) -> store.Taken | None:
    """`queued` -> `submitting`, counting the attempt: the job is taken from its line to be sent; None if
    it is no longer queued. One conditional UPDATE: the duplicate-submission guard."""
    return store.take(ex, job_id, SOURCES[S.submitting] & {S.queued}, S.submitting, now)


def requeue(
    ex: Executor,
    job_id: str,
    now: datetime,
    *,
    refund: bool,
    error_code: str | None = None,
    error_message: str | None = None,
    due_at: datetime | None = None,
) -> bool:
    """`submitting` -> `queued`, back in its place in line, to be taken again from `due_at` (None: at once);
    `refund`: the attempt does not count."""
    values: dict[str, Any] = {"attempts": store.jobs.c.attempts - 1} if refund else {}
    values["due_at"] = due_at
    if error_code is not None:
        values.update(error_code=error_code, error_message=error_message)
    return move(ex, job_id, S.queued, now, **values)


def release_claim(ex: Executor, job_id: str, claimed_at: datetime, now: datetime) -> bool:
    """`submitting` -> `queued`, for a claim whose commit the worker never saw (the connection broke).

    Only the claim made at `claimed_at` is released, and only while nothing else
    touched the row: that worker never sent the job, so the attempt does not count.
    """
    attempts = store.jobs.c.attempts - 1
    return move(ex, job_id, S.queued, now, only_from={S.submitting}, unchanged_since=claimed_at, attempts=attempts)


def mark_submitted(
    ex: Executor, job_id: str, now: datetime, *, task_id: str, answer: dict[str, Any], next_poll_at: datetime
) -> bool:
    return move(
        ex,
        job_id,
        S.submitted,
        now,
        only_from={S.submitting},
        modellix_task_id=task_id,
        submitted_at=now,
        payload=None,
        next_poll_at=next_poll_at,
        last_response=answer,
        error_code=None,
        error_message=None,
    )


def fail_submit(ex: Executor, job_id: str, now: datetime, error_code: str, error_message: str) -> bool:
    return move(ex, job_id, S.failed, now, only_from={S.submitting}, error_code=error_code, error_message=error_message)


def observe(
    ex: Executor,
    job_id: str,
    now: datetime,
    *,
    running: bool,
    next_poll_at: datetime,
    answer: dict[str, Any] | None = None,
    polls: int | None = None,
) -> bool:
    """An active job's task is not finished: `running` moves it to `processing`; the next poll is due then.

    A job already `processing` stays so when Modellix says pending again: statuses do not go back.
    `polls` gives back the number of a poll that was not made.
    """
    values: dict[str, Any] = {"next_poll_at": next_poll_at}
    if answer is not None:
        values["last_response"] = answer
    if polls is not None:
        values["polls"] = polls
    if running:
        return move(ex, job_id, S.processing, now, **values)
    return store.update_if(ex, job_id, IN_PLACE, now, values)


def succeed(
    ex: Executor,
    job_id: str,
    now: datetime,
    *,
    result_urls: list[str],
    answer: dict[str, Any],
    files: list[dict[str, Any]] | None = None,
    archived: outbox.Archived | None = None,
) -> bool:
    """An active job's task succeeded; with `files` and `archived`, its images were archived first."""
    values: dict[str, Any] = {"result_urls": result_urls, "last_response": answer}
    if files is not None:
        values["files"] = files
    return move(ex, job_id, S.succeeded, now, only_from=ACTIVE, archived=archived, **values)


def fail_task(
    ex: Executor, job_id: str, now: datetime, error_code: str, error_message: str, answer: dict[str, Any] | None = None
) -> bool:
    """An active job's task failed, ended without results, or ran out of time."""
    values: dict[str, Any] = {"error_code": error_code, "error_message": error_message}
    if answer is not None:
        values["last_response"] = answer
    return move(ex, job_id, S.failed, now, only_from=ACTIVE, **values)


def cancel(ex: Executor, job_id: str, now: datetime) -> bool:
    """`queued` -> `cancelled`: the job will not be submitted."""
    return move(ex, job_id, S.cancelled, now, error_code="cancelled", error_message="cancelled by an operator")


def cancel_unseen(ex: Executor, job_id: str, now: datetime) -> bool:
    """Record a job no worker has seen yet as `cancelled`: when its message is taken, the claim finds
    the id ended and nothing is submitted. False if the job exists after all."""
    message = "cancelled by an operator before a worker took its message"
    return create(ex, job_id, S.cancelled, {}, None, now, error_code="cancelled", error_message=message)


def reject(
    ex: Executor,
    job_id: str,
    request: dict[str, Any],
    meta: dict[str, Any] | None,
    now: datetime,
    error_message: str,
    **values: Any,
) -> bool:
    """A job whose message is invalid: recorded as `rejected`, never sent. False if the id was taken."""
    return create(
        ex, job_id, S.rejected, request, meta, now, error_code="validation", error_message=error_message, **values
    )
