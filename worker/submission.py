"""Validate → claim → submit → record, for one message. No Celery here.

`handle` returns what the caller must do next (nothing, or retry after a
delay); the Celery task turns that into a retry or an ack.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from marshmallow import ValidationError

from models import JobStatus, store
from models.job import utcnow
from worker import limits, modellix, runtime
from worker.backoff import poll_delay, retry_delay
from worker.schemas import GenerationRequestSchema, MessageSchema, redact_request

log = logging.getLogger("kling_worker.submission")

_message_schema = MessageSchema()
_request_schema = GenerationRequestSchema()
_MAX_STORED_REQUEST = 64 * 1024
BUDGET_RECHECK = 10.0


@dataclass(frozen=True)
class Outcome:
    job_id: str
    status: JobStatus | None  # None: another delivery owns the job, nothing was done
    retry_in: float | None = None
    first_poll_in: float | None = None


def handle(args: tuple[Any, ...], kwargs: dict[str, Any], delivery_id: str, retries: int = 0) -> Outcome:
    """Process one `kling.generate` message; `delivery_id` is the Celery task id,
    `retries` how often this message was scheduled again."""
    if args:
        return _reject(
            delivery_id,
            kwargs.get("request"),
            kwargs.get("metadata"),
            {"_message": ["kling.generate takes keyword arguments only: request, job_id, metadata"]},
        )
    try:
        message = _message_schema.load(kwargs)
    except ValidationError as exc:
        job_id = kwargs.get("job_id")
        # A bad job id cannot key a row: record the job under the delivery id instead.
        if "job_id" in exc.messages or not isinstance(job_id, str):
            job_id = delivery_id
        meta = kwargs.get("metadata") if "metadata" not in exc.messages else None
        return _reject(job_id, kwargs.get("request"), meta, exc.messages)

    job_id = message["job_id"] or delivery_id
    try:
        request = _request_schema.load(message["request"])
    except ValidationError as exc:
        return _reject(job_id, message["request"], message["metadata"], exc.messages)
    return _submit(job_id, request, message["metadata"], retries)


def _submit(job_id: str, request: dict[str, Any], meta: dict[str, Any] | None, retries: int) -> Outcome:
    cfg = runtime.settings()
    stored = redact_request(request)

    # `submitting` is committed before the POST: if this process dies before the
    # answer is recorded the row says so, and the sweeper resolves it
    # (tracking.resolve_interrupted) instead of silently submitting again.
    def claim() -> int | None:
        # With an in-flight limit the check and the claim share one transaction.
        with runtime.session() if cfg.max_in_flight else runtime.connect() as ex:
            limits.check_in_flight(ex)
            return store.claim_for_submit(ex, job_id, stored, meta, utcnow())

    try:
        attempt = limits.wait_for_place(claim)
    except limits.OverBudget:
        with runtime.connect() as s:
            store.add_job(s, job_id, JobStatus.queued, stored, meta, utcnow())
        # Back off while the fleet is full, so a long queue does not churn the
        # broker, but look again at least every BUDGET_RECHECK seconds.
        return Outcome(job_id, JobStatus.queued, retry_in=min(retry_delay(retries + 1, cfg), BUDGET_RECHECK))
    if attempt is None:
        log.info("job %s: already submitted or in progress elsewhere; not submitting again", job_id)
        return Outcome(job_id, None)

    try:
        limits.take_request_slot()
        submission = runtime.client().submit(request)
    except limits.OverBudget as exc:
        _back_to_queue(job_id, refund=True)
        return Outcome(job_id, JobStatus.queued, retry_in=exc.retry_in)
    except modellix.AccountError as exc:
        # Every job would fail the same way: pause the fleet and keep the jobs
        # queued, rather than burn through the queue marking each one failed.
        log.error(
            "job %s: Modellix rejects the account (%s %s); the fleet pauses %.0fs and retries until fixed",
            job_id,
            exc.status,
            exc.message,
            cfg.account_retry,
        )
        limits.pause(cfg.account_retry, f"{exc.status} {exc.message}")
        _back_to_queue(job_id, exc, refund=True)
        return Outcome(job_id, JobStatus.queued, retry_in=retry_delay(1, cfg, cfg.account_retry))
    except modellix.TransientError as exc:
        if isinstance(exc, modellix.RateLimited):
            limits.pause(exc.retry_after or retry_delay(attempt, cfg), "429 from Modellix")
        if attempt >= cfg.max_attempts:
            log.warning("job %s: giving up after %d attempts: %s", job_id, attempt, exc.message)
            return _fail(job_id, exc, JobStatus.submitting)
        delay = retry_delay(attempt, cfg, exc.retry_after)
        log.info("job %s: attempt %d failed (%s), retrying in %.1fs", job_id, attempt, exc.message, delay)
        _back_to_queue(job_id, exc)
        return Outcome(job_id, JobStatus.queued, retry_in=delay)
    except modellix.ModellixError as exc:
        return _fail(job_id, exc, JobStatus.submitting)

    now = utcnow()
    first_poll = poll_delay(0, cfg)
    with runtime.connect() as s:
        store.transition(
            s,
            job_id,
            {JobStatus.submitting},
            now,
            status=JobStatus.submitted.value,
            modellix_task_id=submission.task_id,
            submitted_at=now,
            next_poll_at=now + timedelta(seconds=first_poll),
            last_response=submission.raw,
            error_code=None,
            error_message=None,
        )
    return Outcome(job_id, JobStatus.submitted, first_poll_in=first_poll)


def error_code(exc: modellix.ModellixError) -> str:
    """The API's own code (its HTTP status) where it answered; ours otherwise."""
    return str(exc.status) if exc.status and not isinstance(exc, modellix.AmbiguousSubmit) else exc.code


def _back_to_queue(job_id: str, exc: modellix.ModellixError | None = None, refund: bool = False) -> None:
    """`refund`: the attempt does not count (the API was not at fault for this job)."""
    extra: dict[str, Any] = {"attempts": store.jobs.c.attempts - 1} if refund else {}
    if exc is not None:
        extra.update(error_code=error_code(exc), error_message=exc.message)
    with runtime.connect() as s:
        store.transition(s, job_id, {JobStatus.submitting}, utcnow(), status=JobStatus.queued.value, **extra)


def _fail(job_id: str, exc: modellix.ModellixError, current: JobStatus) -> Outcome:
    now = utcnow()
    with runtime.connect() as s:
        store.transition(
            s,
            job_id,
            {current},
            now,
            status=JobStatus.failed.value,
            error_code=error_code(exc),
            error_message=exc.message,
            finished_at=now,
        )
    log.warning("job %s failed: %s %s", job_id, error_code(exc), exc.message)
    return Outcome(job_id, JobStatus.failed)


def _reject(job_id: str, raw_request: Any, meta: Any, errors: dict[str, Any]) -> Outcome:
    message = json.dumps(errors, ensure_ascii=False)
    log.warning("job %s rejected: %s", job_id, message)
    now = utcnow()
    with runtime.connect() as s:
        created = store.add_job(
            s,
            job_id,
            JobStatus.rejected,
            _storable(raw_request),
            meta if isinstance(meta, dict) else None,
            now,
            error_code="validation",
            error_message=message,
            finished_at=now,
        )
    if not created:
        # The id is taken by an earlier job: that row stays as it is.
        log.warning("job %s: invalid duplicate of an existing job ignored", job_id)
    return Outcome(job_id, JobStatus.rejected if created else None)


def _storable(raw: Any) -> dict[str, Any]:
    """What of an invalid request to keep: all of it, unless it is large (inline images)."""
    try:
        text = json.dumps(raw, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError):
        text = repr(raw)
    if len(text) <= _MAX_STORED_REQUEST and isinstance(raw, dict):
        return raw
    return {"_omitted": True, "bytes": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()}
