"""Results reach the caller: the outbox's rows carried out one at a time. No Celery here.

A job's end left rows in models.outbox: `archive` (keep the result images
before their URLs expire), `webhook` (a signed POST of the job's event) and
`callback` (a Celery task sent with the event). The worker whose poll saw the
task succeed archives the images before it writes the end (`archive_at_end`),
so the archive row is written settled with the end; then it claims the job's
due events at once (`claim_ended`) and carries each out (`deliver`). The beat
sweep claims any due row left behind (an archive to try again, the rows of a
worker that died: `due`) and hands it to a worker. A
callback is only built here and sent by the caller, which has Celery. A row claimed by a worker
that dies comes back when its lease runs out, so every row is carried out at
least once: receivers dedupe by `webhook-id` (the same for every attempt of
one event) or by job id.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Row

from models import outbox, store
from models.job import utcnow
from models.outbox import Channel, State
from worker import backoff
from worker.ops import cpu, logs
from worker.results import archive, webhooks

if TYPE_CHECKING:
    from worker.resources import Resources

log = logging.getLogger("kling_worker.delivery")

# A delivery row read with its job's columns (models.outbox.with_job), named as on models.job.Job.
JobView = Row[Any]

# Rows claimed per sweep.
BATCH = 200
# An image that could not be fetched or stored for a reason that may pass is tried again,
# this many times in all, 2, 4, 8 … seconds apart: result URLs live for minutes, not hours.
ARCHIVE_TRIES = 6

EVENT_TYPES = {
    "succeeded": "job.succeeded",
    "failed": "job.failed",
    "rejected": "job.rejected",
    "cancelled": "job.cancelled",
}


@dataclass(frozen=True)
class Done:
    """What carrying out a row leaves to the caller: a callback to send, rows to carry out next."""

    callback: Callback | None = None
    then: tuple[int, ...] = ()  # the events an archive released, already claimed by this worker


@dataclass(frozen=True)
class Callback:
    """A Celery task for the caller to send: `task` to `queue` with kwargs {"event": event}."""

    task: str
    queue: str
    event: dict[str, Any]


def due(res: Resources) -> list[int]:
    """Claim the rows that are due (for KLING_DELIVERY_LEASE seconds); their ids, for the caller to dispatch."""
    try:
        with res.transaction() as s:
            return [row[0] for row in outbox.claim_due(s, utcnow(), res.settings.delivery_lease, BATCH)]
    except Exception as exc:
        res.put_off(exc, "deliveries")
        return []


def claim_ended(res: Resources, job_id: str) -> list[int]:
    """Claim the outbox rows of a job that just ended that are due (for KLING_DELIVERY_LEASE seconds):
    its archive, or the events of a job that failed; none if another worker took them."""
    try:
        with res.statement() as ex:
            return outbox.claim_job_due(ex, job_id, utcnow(), res.settings.delivery_lease)
    except Exception as exc:
        res.put_off(exc, "deliveries")  # the sweep hands them out once the database is back
        return []


def deliver(res: Resources, delivery_id: int) -> Done:
    """Carry out one claimed row: archive, or send a webhook; a callback is returned to be sent.

    Through a database outage the row is left as claimed: its lease runs out and the sweep
    hands it out again (a webhook already sent goes again: deliveries are at least once).
    """
    with logs.bound():  # _deliver binds the job once it has read the row
        try:
            return _deliver(res, delivery_id)
        except Exception as exc:
            res.put_off(exc, "deliveries")
            return Done()


def _deliver(res: Resources, delivery_id: int) -> Done:
    with res.statement() as ex:
        job = outbox.with_job(ex, delivery_id)
    if job is None or job.state != State.pending.value:
        return Done()  # settled meanwhile (another worker, after a lease ran out)
    channel, attempts, created_at = Channel(job.channel), job.attempts, job.row_created_at
    logs.bind(job_id=job.id, modellix_task_id=job.modellix_task_id)
    if channel is Channel.archive:
        return Done(then=_archive(res, delivery_id, job, attempts))
    event = event_of(job)
    if channel is Channel.webhook:
        _webhook(res, delivery_id, job, event, attempts, created_at)
        return Done()
    callback = job.callback or {}
    return Done(Callback(str(callback["task"]), str(callback["queue"]), event))


def sent(res: Resources, delivery_id: int) -> None:
    """The caller sent the callback this row stands for."""
    with res.transaction() as s:
        outbox.settle(s, delivery_id, utcnow(), State.done)


def not_sent(res: Resources, delivery_id: int, error: str) -> None:
    """The broker refused the callback: try again later, like a webhook."""
    now = utcnow()
    with res.transaction() as s:
        row = outbox.get(s, delivery_id)
        delay = webhooks.next_attempt_delay(row.attempts if row else 1)
        outbox.retry_at(s, delivery_id, now, now + timedelta(seconds=delay), error)


def event_of(job: JobView) -> dict[str, Any]:
    """The event a caller receives when its job ends (the README's contract)."""
    return {
        "type": EVENT_TYPES[job.status],
        "job_id": job.id,
        "status": job.status,
        "tenant": job.tenant,
        "modellix_task_id": job.modellix_task_id,
        "result_urls": job.result_urls or [],
        "files": job.files or [],
        "error_code": job.error_code,
        "error_message": job.error_message,
        "metadata": job.meta,
        "created_at": job.created_at.isoformat(),
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }


def event_id(job_id: str) -> str:
    """The `webhook-id` of a job's event: the same for every attempt and every redelivery.

    A digest, because a job id may hold a `.`, which Standard Webhooks ids may not.
    """
    return "msg_" + hashlib.sha256(job_id.encode()).hexdigest()[:32]


# -- the channels --------------------------------------------------------------


def archive_at_end(res: Resources, job_id: str, urls: list[str]) -> tuple[list[dict[str, Any]], outbox.Archived]:
    """Archive a job's images before its end is written, by the worker whose poll saw the task finish.

    The end is then written with the files and a settled archive row (models.outbox.add_for):
    the rows need no claim, read or settle afterwards, and a job is `succeeded` with its
    files already recorded. An image that could not be kept for a reason that may pass is
    tried again later by the outbox, like any archive row.
    """
    with cpu.phase("deliver"):
        files, worth_retrying, archiving = _keep_images(res, job_id, urls, [])
        state, error = _outcome(job_id, files, worth_retrying, 1, archiving)
        due = utcnow() + timedelta(seconds=_retry_delay(1)) if state is State.pending else None
        return files, outbox.Archived(state, due, error)


def _archive(res: Resources, delivery_id: int, job: JobView, attempts: int) -> tuple[int, ...]:
    """Keep each result image not kept yet; settled once all are kept, or once no retry can help.

    Returns the job's events it released, claimed for this worker to send at once (not a sweep later).
    """
    files, worth_retrying, archiving = _keep_images(res, job.id, job.result_urls or [], job.files or [])
    state, error = _outcome(job.id, files, worth_retrying, attempts, archiving)
    now = utcnow()
    with res.atomic() as s:
        store.set_files(s, job.id, files, now)
        if state is State.pending:
            outbox.retry_at(s, delivery_id, now, now + timedelta(seconds=_retry_delay(attempts)), error or "")
            return ()
        outbox.settle(s, delivery_id, now, state, error)
        if job.webhook is None and job.callback is None:
            return ()  # no event waits for this archive
        outbox.release_events(s, job.id, now)
        return tuple(outbox.claim_job_due(s, job.id, now, res.settings.delivery_lease))


def _retry_delay(attempts: int) -> float:
    # 2, 4, 8 … seconds after attempt 1, 2, 3 …: result URLs live for minutes, not hours.
    return backoff.delay(attempts, base=2.0)


def _keep_images(
    res: Resources, job_id: str, urls: list[str], earlier: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], bool, bool]:
    """Each result image kept (or why not), skipping those an earlier attempt kept:
    (files in the order of the URLs, whether a retry may help, whether the archive is on)."""
    cfg = res.settings
    kept_in = res.archive
    files: list[dict[str, Any]] = []
    worth_retrying = False
    for index, url in enumerate(urls):
        if index < len(earlier) and earlier[index].get("uri"):
            files.append(earlier[index])  # kept by an earlier attempt
        elif kept_in is None:
            files.append(_missing("not archived: KLING_ARCHIVE is off"))
        else:
            try:
                kept = archive.archive_one(kept_in, job_id, index, url, cfg.archive_max_bytes, cfg.read_timeout)
                files.append(kept.to_json())
            except archive.ArchiveError as exc:
                files.append(_missing(str(exc)))
                worth_retrying = worth_retrying or exc.retryable
    return files, worth_retrying, kept_in is not None


def _outcome(
    job_id: str, files: list[dict[str, Any]], worth_retrying: bool, attempts: int, archiving: bool
) -> tuple[State, str | None]:
    """What an archive attempt leaves its row in: pending (try again), failed or done; and why not done."""
    missing = [f["error"] for f in files if not f["uri"]]
    error = "; ".join(missing) or None
    if worth_retrying and attempts < ARCHIVE_TRIES:
        return State.pending, error
    if missing and archiving:
        log.warning(
            "job %s: %d of %d images not archived: %s",
            job_id,
            len(missing),
            len(files),
            missing[0],
            extra={"event": "archive_failed"},
        )
        return State.failed, error
    return State.done, error


def _missing(reason: str) -> dict[str, Any]:
    return {"uri": None, "sha256": None, "bytes": None, "content_type": None, "error": reason}


def _webhook(
    res: Resources, delivery_id: int, job: JobView, event: dict[str, Any], attempts: int, created_at: datetime
) -> None:
    cfg = res.settings
    url = job.webhook or ""
    refused = webhooks.refused(url, cfg.webhook_secret, cfg.webhook_hosts)
    now = utcnow()
    if refused:
        _settle(res, delivery_id, State.failed, refused)
        log.warning("job %s: webhook not sent: %s", job.id, refused, extra={"event": "webhook_refused"})
        return
    secret, session = res.webhook_secret, res.webhook_session
    attempt = webhooks.send(session, url, event_id(job.id), webhooks.encode(event), secret, cfg.webhook_timeout)
    if attempt.ok:
        _settle(res, delivery_id, State.done)
        return
    error = attempt.error or f"HTTP {attempt.status}"
    if not attempt.retryable or webhooks.give_up(created_at.timestamp(), time.time(), cfg.webhook_retry_for):
        _settle(res, delivery_id, State.failed, error)
        log.warning(
            "job %s: webhook given up after %d attempts: %s",
            job.id,
            attempts,
            error,
            extra={"event": "delivery_failed"},
        )
        return
    delay = webhooks.next_attempt_delay(attempts, attempt.retry_after)
    with res.transaction() as s:
        outbox.retry_at(s, delivery_id, now, now + timedelta(seconds=delay), error)
    log.info(
        "job %s: webhook attempt %d failed (%s); next in %.0fs",
        job.id,
        attempts,
        error,
        delay,
        extra={"event": "delivery_retry"},
    )


def _settle(res: Resources, delivery_id: int, state: State, error: str | None = None) -> None:
    with res.transaction() as s:
        outbox.settle(s, delivery_id, utcnow(), state, error)
