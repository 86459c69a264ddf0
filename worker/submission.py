"""A job from its message to its task: validate → queue (`handle`), then take → send → record
(`take_next`, `send`). No Celery here.

A `kling.generate` message is validated and its job recorded `queued` in its tenant's line, and the
message is done. A submit thread (worker.wiring.dispatcher) takes the next job from the line when the
fleet's budget lets one go (worker.fleet.share orders the line), sends it, and records the answer.
Each step calls only downward (the schemas, the lifecycle, the fleet limits, the client, the
API-error policy). Each returns an Outcome: the status it gave the job, and what comes next
(`next_step`, one of Finished, Retry, Follow, HandOn): nothing, send the message again after a
delay (the database is away), start polling the submitted task, or hand on a fact the database has
not taken. Once a job is taken, everything Modellix answers is written as a Fact (worker.facts),
which a database outage cannot make the worker drop.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, TypeAlias

from marshmallow import ValidationError

from models import JobStatus, db, lifecycle, store
from models.job import DEFAULT_TENANT, utcnow
from worker import facts, modellix
from worker.facts import Claimed, Fact, Kept, Requeued, SubmitFailed, Submitted
from worker.fleet import places, share
from worker.fleet.pause import pause_fleet
from worker.fleet.waiting import OverBudget
from worker.modellix.policy import Action, judge_submit
from worker.ops import cpu, logs, metrics, outages
from worker.polling import learning, schedule
from worker.resources import Resources
from worker.results import webhooks
from worker.schemas import GenerationRequestSchema, MessageSchema, redact_request

log = logging.getLogger("kling_worker.submission")

_message_schema = MessageSchema()
_request_schema = GenerationRequestSchema()
# An invalid request larger than this (inline images) is kept as its size and digest only.
_MAX_STORED_REQUEST = 64 * 1024
# The message keyword that carries a fact handed on by a stopping worker (not part of the public contract).
CARRIED = "_kling_fact"


# -- what a message leads to ----------------------------------------------------


@dataclass(frozen=True)
class Finished:
    """Nothing more for this message."""


@dataclass(frozen=True)
class Retry:
    """Send the message again after `after` seconds (the database is away)."""

    after: float


@dataclass(frozen=True)
class Follow:
    """The job's task was submitted: poll it as `first_poll` says."""

    first_poll: schedule.NextPoll


@dataclass(frozen=True)
class HandOn:
    """A fact the database has not taken before this process had to let go (an answer, a claim):
    send it on in a message (CARRIED) for the next worker to write."""

    fact: Fact


NextStep: TypeAlias = Finished | Retry | Follow | HandOn


@dataclass(frozen=True)
class Outcome:
    """What one step (a message, a submit) did to its job, and what comes next."""

    job_id: str
    status: JobStatus | None  # the status this delivery gave the job; None: it changed nothing
    next_step: NextStep = Finished()

    @property
    def duplicate(self) -> bool:
        """Another delivery recorded the job before, so this one did nothing."""
        return self.status is None


def handle(res: Resources, args: tuple[Any, ...], kwargs: dict[str, Any], message_id: str, retries: int = 0) -> Outcome:
    """Process one message; `message_id` is its Celery task id, `retries` how often it was sent again."""
    given = kwargs.get("job_id")
    job_id = given if isinstance(given, str) else message_id  # until the message is validated (_reject)
    # What no nested phase claims (the message's and the request's schemas, the webhook check) is `validate`.
    with logs.bound(job_id=job_id), cpu.phase("validate"):
        try:
            return _handle(res, args, kwargs, message_id)
        except Exception as exc:
            # Nothing was sent (answers are held, never raised): the message waits on the broker.
            res.put_off(exc, "messages")
            return Outcome(job_id, None, Retry(outages.backoff(retries)))


def _handle(res: Resources, args: tuple[Any, ...], kwargs: dict[str, Any], message_id: str) -> Outcome:
    if CARRIED in kwargs:
        return _write_carried(res, facts.from_json(kwargs[CARRIED]))
    if args:
        errors = {"_message": ["kling.generate takes keyword arguments only: request, job_id, metadata"]}
        return _reject(res, message_id, kwargs.get("request"), kwargs.get("metadata"), errors)
    try:
        message = _message_schema.load(kwargs)
    except ValidationError as exc:
        errors = _as_dict(exc)
        job_id = kwargs.get("job_id")
        # A bad job id cannot key a row: record the job under the message id instead.
        if "job_id" in errors or not isinstance(job_id, str):
            job_id = message_id
        meta = kwargs.get("metadata") if "metadata" not in errors else None
        tenant = kwargs.get("tenant", DEFAULT_TENANT) if "tenant" not in errors else DEFAULT_TENANT
        return _reject(res, job_id, kwargs.get("request"), meta, errors, {"tenant": tenant})

    job_id = message["job_id"] or message_id
    refused = _webhook_refused(res, message["webhook"])
    if refused:
        # Without the webhook: a job rejected for it must not try to send its event there.
        columns = {**_columns(message), "webhook": None, "callback": None}
        return _reject(res, job_id, message["request"], message["metadata"], {"webhook": [refused]}, columns)
    try:
        request = _request_schema.load(message["request"])
    except ValidationError as exc:
        return _reject(res, job_id, message["request"], message["metadata"], _as_dict(exc), _columns(message))
    return _enqueue(res, job_id, request, message["metadata"], _columns(message))


def _webhook_refused(res: Resources, url: str | None) -> str | None:
    """Why this fleet cannot send to the webhook a message asks for (its shape is the schema's job)."""
    if url is None:
        return None
    cfg = res.settings
    return webhooks.refused(url, cfg.webhook_secret, cfg.webhook_hosts)


def _columns(message: dict[str, Any]) -> dict[str, Any]:
    """The job's columns a valid message sets besides its request and metadata: where the caller hears
    of its end (webhook, callback), the job it retries, its tenant and its priority."""
    return {key: message[key] for key in ("webhook", "callback", "retry_of", "tenant", "priority")}


def _enqueue(
    res: Resources, job_id: str, request: dict[str, Any], meta: dict[str, Any] | None, columns: dict[str, Any]
) -> Outcome:
    """Record a valid job as `queued`, in its tenant's line (worker.fleet.share): the message is done.

    The job waits in the table, not on the broker: a submit thread of any worker takes it when its
    turn comes (`take_next`). Inline images wait in `payload` until then (`request` keeps digests).
    """
    stored = redact_request(request)
    now = utcnow()
    tenant, priority = columns["tenant"], columns["priority"]
    logs.bind(tenant=tenant)
    line = share.line_of(now.timestamp(), priority, res.settings.priority_aging)
    payload = request if stored != request else None
    with cpu.phase("record"), res.statement() as ex:
        created = lifecycle.create(
            ex, job_id, JobStatus.queued, stored, meta, now, line=line, payload=payload, **columns
        )
    if not created:
        _duplicate(res, job_id)
        return Outcome(job_id, None)
    log.info("job %s queued (tenant %s, priority %d)", job_id, tenant, priority, extra={"event": "job_queued"})
    return Outcome(job_id, JobStatus.queued)


def _duplicate(res: Resources, job_id: str) -> None:
    with res.transaction() as s:
        found = store.get_job(s, job_id)
        status = found.status if found else "gone"
    if status == JobStatus.cancelled.value:
        log.info(
            "job %s was cancelled before a worker took its message; the message is dropped",
            job_id,
            extra={"event": "cancelled_before_submit"},
        )
    else:
        log.info(
            "job %s: already %s (another delivery recorded it); not queued again",
            job_id,
            status,
            extra={"event": "duplicate_delivery"},
        )


def take_next(res: Resources) -> store.Taken | Outcome | None:
    """Wait for the fleet's budget to let one more submit go, then take the next job from the line
    (worker.fleet.share; the job is now `submitting`): the caller sends it at once (`send`).

    None: no job may go now (the line is empty, or its tenants are at their caps). An Outcome: the
    database went away during the claim, so its commit is unknown; the claim is released (held through
    the outage, or handed on). Raises OverBudget when the wait ends first (MAX_HOLD, the worker stops).
    """
    chosen: list[str] = []
    tried: list[datetime] = []

    def claim(ex: db.Executor) -> store.Taken | None:
        tried.append(utcnow())
        chosen.clear()
        return share.take_next(ex, tried[-1], chosen)

    try:
        with cpu.phase("claim"):
            return places.claim_turn(res, claim)
    except OverBudget:
        raise
    except Exception as exc:
        if not (chosen and db.unreachable(exc)):
            raise
        # The claim may have committed unseen: released once the database answers (nothing was sent).
        res.outage.defer("submits", exc)
        return _settle(res, Claimed(chosen[-1], tried[-1]), Outcome(chosen[-1], JobStatus.queued))


def send(res: Resources, taken: store.Taken) -> Outcome:
    """Send a job taken from the line, and record what Modellix answered."""
    with logs.bound(job_id=taken.job_id, tenant=taken.tenant):
        outcome = _send(res, taken.job_id, taken.request, taken.attempt)
    if outcome.status is JobStatus.submitted:
        metrics.job_submitted(taken.tenant)
    return outcome


def _send(res: Resources, job_id: str, request: dict[str, Any], attempt: int) -> Outcome:
    try:
        # The fleet's budget was taken before the claim (places.claim_turn): send at once.
        with cpu.phase("submit"):
            submitted = res.client.submit(request)
    except modellix.ModellixError as exc:
        return _after_error(res, job_id, exc, attempt)
    logs.bind(modellix_task_id=submitted.task_id)
    log.info("job %s submitted as Modellix task %s", job_id, submitted.task_id, extra={"event": "job_submitted"})
    first = learning.first_poll(res, job_id, request)
    fact = Submitted(job_id, utcnow(), submitted.task_id, submitted.raw, first.delay)
    return _settle(res, fact, Outcome(job_id, JobStatus.submitted, Follow(first)))


def _after_error(res: Resources, job_id: str, exc: modellix.ModellixError, attempt: int) -> Outcome:
    verdict = judge_submit(exc, attempt, res.settings)
    code, message = verdict.error_code or exc.stored_code, exc.message
    if verdict.error_code == modellix.AmbiguousSubmit.code:
        message = f"HTTP {exc.status} {message}: the task may exist, so the job is not submitted again"
    elif verdict.resubmits_unknown:
        log.warning(
            "job %s: Modellix answered %s to a submit; sending it again as KLING_SUBMIT_5XX=retry allows "
            "(a second task may be created and billed)",
            job_id,
            exc.status,
            extra={"event": "submit_resent"},
        )
    if verdict.action is Action.fail:
        outcome = _settle(res, SubmitFailed(job_id, utcnow(), code, message), Outcome(job_id, JobStatus.failed))
        log.warning(
            "job %s failed after %d attempt(s): %s %s", job_id, attempt, code, message, extra={"event": "submit_failed"}
        )
    else:
        requeued = Requeued(
            job_id, utcnow(), refund=not verdict.counts, error_code=code, error_message=message, after=verdict.delay
        )
        outcome = _settle(res, requeued, Outcome(job_id, JobStatus.queued))
        if not verdict.account:
            log.info(
                "job %s: attempt %d failed (%s), retrying in %.1fs",
                job_id,
                attempt,
                message,
                verdict.delay,
                extra={"event": "submit_retry"},
            )
    if verdict.account:
        log.error(
            "job %s: Modellix rejects the account (%s %s); the fleet pauses %.0fs and retries until fixed",
            job_id,
            exc.status,
            exc.message,
            verdict.pause,
            extra={"event": "fleet_paused"},
        )
    if verdict.pause:
        pause_fleet(res, verdict.pause, verdict.pause_reason)
    return outcome


def _settle(res: Resources, fact: Fact, outcome: Outcome) -> Outcome:
    """Write what the API said (holding it through an outage): `outcome` once written; if the process
    had to let go first, the same outcome with the fact handed on."""
    if facts.keep(res, fact) is Kept.written:
        return outcome
    return replace(outcome, next_step=HandOn(fact))


def _write_carried(res: Resources, fact: Fact) -> Outcome:
    """A fact a worker could not write (it had to let go during an outage): write it, then go on as
    the job's new status says (a job queued again waits in its line; the message is done)."""
    match fact:
        case Submitted():
            due = fact.at + timedelta(seconds=fact.first_poll)
            first = schedule.NextPoll(0, max(0.0, (due - utcnow()).total_seconds()))
            return _settle(res, fact, Outcome(fact.job_id, JobStatus.submitted, Follow(first)))
        case SubmitFailed():
            return _settle(res, fact, Outcome(fact.job_id, JobStatus.failed))
        case _:
            # Claimed, Requeued (a poll's results are handed on in kling.poll messages, never here).
            return _settle(res, fact, Outcome(fact.job_id, JobStatus.queued))


@cpu.timed("record")
def _reject(
    res: Resources,
    job_id: str,
    raw_request: Any,
    meta: Any,
    errors: dict[str, Any],
    columns: dict[str, Any] | None = None,
) -> Outcome:
    logs.bind(job_id=job_id)  # the message id when the message's own job id is invalid
    message = json.dumps(errors, ensure_ascii=False)
    log.warning("job %s rejected: %s", job_id, message, extra={"event": "job_rejected"})
    with res.transaction() as ex:
        created = lifecycle.reject(
            ex,
            job_id,
            _storable(raw_request),
            meta if isinstance(meta, dict) else None,
            utcnow(),
            message,
            **(columns or {}),
        )
    if not created:
        # The id is taken by an earlier job: that row stays as it is.
        log.warning(
            "job %s: invalid duplicate of an existing job ignored", job_id, extra={"event": "duplicate_rejected"}
        )
        return Outcome(job_id, None)
    metrics.job_ended(JobStatus.rejected.value, "validation")
    return Outcome(job_id, JobStatus.rejected)


def _as_dict(exc: ValidationError) -> dict[str, Any]:
    messages = exc.messages
    return messages if isinstance(messages, dict) else {"_schema": messages}


def _storable(raw: Any) -> dict[str, Any]:
    """What of an invalid request to keep: all of it, unless it is large (inline images)."""
    try:
        text = json.dumps(raw, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError):
        text = repr(raw)
    if len(text) <= _MAX_STORED_REQUEST and isinstance(raw, dict):
        return raw
    return {"_omitted": True, "bytes": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()}
