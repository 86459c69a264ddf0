"""One `kling.generate` message: validate → claim → send → record. No Celery here.

Each step calls only downward (the schemas, the lifecycle, the fleet limits,
the client, the API-error policy). `handle` returns an Outcome: the status the
message gave its job, and what the Celery task does next (`next_step`, one of Finished,
Retry, Follow, HandOn): nothing, send the message again after a delay, start
polling the submitted task, or hand on a fact the database has not taken.
Once a job is claimed, everything Modellix answers is written as a Fact
(worker.facts), which a database outage cannot make the worker drop.
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
from models.job import utcnow
from worker import facts, modellix
from worker.facts import Claimed, Fact, Kept, Requeued, SubmitFailed, Submitted
from worker.fleet import places
from worker.fleet.pause import pause_fleet
from worker.fleet.waiting import OverBudget
from worker.modellix.policy import Action, judge_submit, retry_delay
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
# A job waiting for the fleet's budget is looked at again at least this often.
BUDGET_RECHECK = 10.0
# The message keyword that carries a fact handed on by a stopping worker (not part of the public contract).
CARRIED = "_kling_fact"


# -- what a message leads to ----------------------------------------------------


@dataclass(frozen=True)
class Finished:
    """Nothing more for this message."""


@dataclass(frozen=True)
class Retry:
    """Send the message again after `after` seconds (the job waits `queued`, or the database is away)."""

    after: float


@dataclass(frozen=True)
class Follow:
    """The job's task was submitted: poll it as `first_poll` says."""

    first_poll: schedule.NextPoll


@dataclass(frozen=True)
class HandOn:
    """A fact the database has not taken before this process had to let go (an answer, a claim):
    send the message again after `after` seconds, carrying the fact (CARRIED) for the next delivery to write."""

    fact: Fact
    after: float


NextStep: TypeAlias = Finished | Retry | Follow | HandOn


@dataclass(frozen=True)
class Outcome:
    """What one delivery of a message did to its job, and what the Celery task does next."""

    job_id: str
    status: JobStatus | None  # the status this delivery gave the job; None: it changed nothing
    next_step: NextStep = Finished()

    @property
    def duplicate(self) -> bool:
        """Another delivery owns (or owned) the job, so this one did nothing."""
        return self.status is None


def handle(res: Resources, args: tuple[Any, ...], kwargs: dict[str, Any], message_id: str, retries: int = 0) -> Outcome:
    """Process one message; `message_id` is its Celery task id, `retries` how often it was sent again."""
    given = kwargs.get("job_id")
    job_id = given if isinstance(given, str) else message_id  # until the message is validated (_reject)
    # What no nested phase claims (the message's and the request's schemas, the webhook check) is `validate`.
    with logs.bound(job_id=job_id), cpu.phase("validate"):
        try:
            return _handle(res, args, kwargs, message_id, retries)
        except Exception as exc:
            # Nothing was sent (answers are held, never raised): the message waits on the broker.
            res.put_off(exc, "messages")
            return Outcome(job_id, None, Retry(outages.backoff(retries)))


def _handle(res: Resources, args: tuple[Any, ...], kwargs: dict[str, Any], message_id: str, retries: int) -> Outcome:
    if CARRIED in kwargs:
        kwargs = dict(kwargs)
        carried = _write_carried(res, facts.from_json(kwargs.pop(CARRIED)))
        if carried is not None:
            return carried
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
        return _reject(res, job_id, kwargs.get("request"), meta, errors)

    job_id = message["job_id"] or message_id
    refused = _webhook_refused(res, message["webhook"])
    if refused:
        # Without the webhook: a job rejected for it must not try to send its event there.
        link = {"retry_of": message["retry_of"]}
        return _reject(res, job_id, message["request"], message["metadata"], {"webhook": [refused]}, link)
    try:
        request = _request_schema.load(message["request"])
    except ValidationError as exc:
        return _reject(res, job_id, message["request"], message["metadata"], _as_dict(exc), _contact(message))
    return _submit(res, job_id, request, message["metadata"], _contact(message), retries)


def _webhook_refused(res: Resources, url: str | None) -> str | None:
    """Why this fleet cannot send to the webhook a message asks for (its shape is the schema's job)."""
    if url is None:
        return None
    cfg = res.settings
    return webhooks.refused(url, cfg.webhook_secret, cfg.webhook_hosts)


def _contact(message: dict[str, Any]) -> dict[str, Any]:
    """The job's webhook and callback columns (where the caller hears of its end), and the job it retries."""
    return {"webhook": message["webhook"], "callback": message["callback"], "retry_of": message["retry_of"]}


def _submit(
    res: Resources,
    job_id: str,
    request: dict[str, Any],
    meta: dict[str, Any] | None,
    contact: dict[str, Any],
    retries: int,
) -> Outcome:
    stored = redact_request(request)
    try:
        attempt = _claim(res, job_id, stored, meta, contact)
    except ClaimUnknown as unknown:
        # The claim may have committed unseen: the next delivery releases it if so (nothing was sent).
        res.outage.defer("messages", unknown.cause)
        return Outcome(job_id, None, HandOn(Claimed(job_id, unknown.claimed_at), outages.backoff(retries)))
    except OverBudget as over:
        with res.statement() as ex:
            lifecycle.create(ex, job_id, JobStatus.queued, stored, meta, utcnow(), **contact)
        # The wait in place ran out (or the worker is stopping): the message goes back. When the
        # budget's next turn is unknown (a full fleet), back off, but look again at least every
        # BUDGET_RECHECK seconds.
        retry_in = over.retry_in or min(retry_delay(retries + 1, res.settings), BUDGET_RECHECK)
        return Outcome(job_id, JobStatus.queued, Retry(retry_in))
    if attempt is None:
        with res.transaction() as s:
            found = store.get_job(s, job_id)
            status = found.status if found else "gone"
        if status == JobStatus.cancelled.value:
            log.info(
                "job %s was cancelled before it was submitted; its message is dropped",
                job_id,
                extra={"event": "cancelled_before_submit"},
            )
        else:
            log.info(
                "job %s: already %s (another delivery took it); not submitting again",
                job_id,
                status,
                extra={"event": "duplicate_delivery"},
            )
        return Outcome(job_id, None)
    return _send(res, job_id, request, attempt)


@cpu.timed("claim")
def _claim(
    res: Resources, job_id: str, stored: dict[str, Any], meta: dict[str, Any] | None, contact: dict[str, Any]
) -> int | None:
    """Take the job for this delivery (`submitting`, committed right before the POST); its attempt number.

    If this process dies before the answer is recorded, the row says so and the
    sweep resolves it (tracking.resolve_interrupted) instead of silently
    submitting again. The fleet's limits (worker.fleet.places.claim_turn) decide when:
    this thread waits in place, holding its message, until the budget lets it go.
    """
    # When the last claim was made: an outage may hide its commit (ClaimUnknown). Before any claim
    # (the budget being read, the connection being opened) nothing matches it, and releasing it is a no-op.
    tried = [utcnow()]

    def claim(ex: db.Executor) -> int | None:
        tried.append(utcnow())
        return lifecycle.claim_for_submit(ex, job_id, stored, meta, tried[-1], **contact)

    try:
        return places.claim_turn(res, claim)
    except OverBudget:
        raise
    except Exception as exc:
        raise ClaimUnknown.after(exc, tried[-1]) from exc


class ClaimUnknown(Exception):
    """The database became unreachable during a claim: it may have committed without the worker seeing it."""

    def __init__(self, cause: Exception, claimed_at: datetime):
        super().__init__(str(cause))
        self.cause = cause
        self.claimed_at = claimed_at

    @classmethod
    def after(cls, exc: Exception, claimed_at: datetime) -> Exception:
        """The exception to raise for `exc`: a ClaimUnknown for an outage, `exc` itself for anything else."""
        return cls(exc, claimed_at) if db.unreachable(exc) else exc


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
        requeued = Requeued(job_id, utcnow(), refund=not verdict.counts, error_code=code, error_message=message)
        outcome = _settle(res, requeued, Outcome(job_id, JobStatus.queued, Retry(verdict.delay)))
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
    had to let go first, the same outcome with the fact handed on (after the retry's delay, if any)."""
    if facts.keep(res, fact) is Kept.written:
        return outcome
    after = outcome.next_step.after if isinstance(outcome.next_step, Retry) else 0.0
    return replace(outcome, next_step=HandOn(fact, after))


def _write_carried(res: Resources, fact: Fact) -> Outcome | None:
    """A fact an earlier delivery could not write (it had to let go during an outage): write it,
    then go on as the job's new status says.

    None when the job is queued again (a refused or rate-limited try, a claim
    released): this delivery then takes it like any other message.
    """
    match fact:
        case Submitted():
            due = fact.at + timedelta(seconds=fact.first_poll)
            first = schedule.NextPoll(0, max(0.0, (due - utcnow()).total_seconds()))
            return _settle(res, fact, Outcome(fact.job_id, JobStatus.submitted, Follow(first)))
        case SubmitFailed():
            return _settle(res, fact, Outcome(fact.job_id, JobStatus.failed))
        case _:
            # Claimed, Requeued (a poll's results are handed on in kling.poll messages, never here).
            outcome = _settle(res, fact, Outcome(fact.job_id, JobStatus.queued))
            return outcome if isinstance(outcome.next_step, HandOn) else None


@cpu.timed("record")
def _reject(
    res: Resources,
    job_id: str,
    raw_request: Any,
    meta: Any,
    errors: dict[str, Any],
    contact: dict[str, Any] | None = None,
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
            **(contact or {}),
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
