"""Status tracking: poll a submitted Modellix task until it ends. No Celery here.

Schedule: polls at the gaps of backoff.poll_delay (2 s, then x1.25, at most
30 s), kept by the submitting worker's own poller (worker.poller). A job whose
task has not ended `poll_deadline` seconds after submission fails with
`timeout`. Nothing relies on that process alone: the periodic sweep
re-dispatches any active job whose poll is overdue (worker killed or
restarted) through the broker, and the poll token in the row
(models.store.claim_poll) keeps two workers from polling one job at once.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from models import ACTIVE, JobStatus, store
from models.job import utcnow
from worker import limits, modellix, runtime
from worker.backoff import poll_delay
from worker.config import Settings
from worker.submission import error_code

log = logging.getLogger("kling_worker.tracking")

# How late a scheduled poll may be before the sweep assumes its message is gone.
OVERDUE_SLACK = 10.0
SWEEP_BATCH = 500


def _lease(cfg: Settings) -> float:
    """How long a claimed poll may take before the sweep gives it to another worker."""
    return cfg.connect_timeout + cfg.read_timeout + OVERDUE_SLACK


def poll(job_id: str, seq: int) -> tuple[int, float] | None:
    """Make poll number `seq` of a job: (next poll's number, seconds until it), None when done."""
    cfg = runtime.settings()
    now = utcnow()
    with runtime.connect() as s:
        claimed = store.claim_poll(s, job_id, seq, now, _lease(cfg))
    if claimed is None:
        return None  # finished, or another worker holds this poll
    task_id, submitted_at = claimed
    deadline = submitted_at + timedelta(seconds=cfg.poll_deadline)
    delay = poll_delay(seq + 1, cfg)

    try:
        # The slot is taken right before the request, so the spacing holds at the API.
        limits.take_request_slot()
        state = runtime.client().get_task(task_id)
    except limits.OverBudget as exc:
        # This poll did not happen: give its number back and try again later.
        return _reschedule(job_id, seq, now, deadline, exc.retry_in, polls=seq)
    except modellix.NotFound as exc:
        return _finish(job_id, JobStatus.failed, error_code=error_code(exc), error_message=exc.message)
    except modellix.AccountError as exc:
        log.error("job %s: Modellix rejects the account while polling (%s); polling slowly", job_id, exc.message)
        limits.pause(cfg.account_retry, f"{exc.status} {exc.message}")
        delay = max(delay, cfg.account_retry)
    except modellix.ModellixError as exc:
        log.info("job %s: poll failed (%s); next poll in %.1fs", job_id, exc.message, delay)
        delay = max(delay, exc.retry_after or 0.0)
        if isinstance(exc, modellix.RateLimited):
            limits.pause(delay, "429 from Modellix")
    else:
        if state.succeeded and state.result_urls:
            return _finish(job_id, JobStatus.succeeded, result_urls=state.result_urls, last_response=state.raw)
        if state.succeeded:
            return _finish(
                job_id,
                JobStatus.failed,
                error_code="no_results",
                last_response=state.raw,
                error_message=f"task {task_id} succeeded without any http(s) result URL",
            )
        if state.failed:
            return _finish(
                job_id,
                JobStatus.failed,
                error_code="task_failed",
                error_message=state.error_message,
                last_response=state.raw,
            )
        if state.status.lower() not in ("pending", "processing", "running", "queued", "submitted"):
            log.warning("job %s: unknown Modellix status %r, treated as still running", job_id, state.status)
        status = JobStatus.submitted if state.status.lower() == "pending" else JobStatus.processing
        return _reschedule(job_id, seq + 1, now, deadline, delay, status=status.value, last_response=state.raw)
    return _reschedule(job_id, seq + 1, now, deadline, delay)


def _reschedule(
    job_id: str, next_seq: int, now: datetime, deadline: datetime, delay: float, **values: object
) -> tuple[int, float] | None:
    if now >= deadline:
        return _finish(
            job_id,
            JobStatus.failed,
            error_code="timeout",
            error_message=f"Modellix task not finished by the deadline ({deadline.isoformat()})",
        )
    delay = min(delay, max(0.0, (deadline - now).total_seconds()))
    with runtime.connect() as s:
        moved = store.transition(s, job_id, ACTIVE, now, next_poll_at=now + timedelta(seconds=delay), **values)
    return (next_seq, delay) if moved else None


def _finish(job_id: str, status: JobStatus, **values: object) -> None:
    now = utcnow()
    with runtime.connect() as s:
        store.transition(s, job_id, ACTIVE, now, status=status.value, finished_at=now, next_poll_at=None, **values)
    log.info("job %s %s", job_id, status.value)
    return None


def sweep() -> list[tuple[str, int]]:
    """Periodic repair; returns the polls to dispatch again.

    - active jobs whose next poll is overdue get it re-dispatched;
    - active jobs past the deadline fail with `timeout` (by their next poll);
    - jobs stuck in `submitting` longer than `submit_grace` (their worker died
      between committing `submitting` and recording the answer) fail with
      `submit_interrupted`, see resolve_interrupted.
    """
    cfg = runtime.settings()
    now = utcnow()
    with runtime.session() as s:
        overdue = store.claim_overdue_polls(s, now - timedelta(seconds=OVERDUE_SLACK), _lease(cfg), SWEEP_BATCH)
    if overdue:
        log.warning("re-dispatching %d overdue polls", len(overdue))
    resolve_interrupted(now - timedelta(seconds=cfg.submit_grace))
    return overdue


def resolve_interrupted(before: datetime) -> int:
    """Fail jobs left in `submitting` since before `before`.

    Modellix has no idempotency key and no way to look a task up by anything
    but its id, so a job whose POST may or may not have reached Modellix cannot
    be resubmitted without risking a second, billed generation. It fails with
    `submit_interrupted`; the caller re-enqueues under a new job id if it wants
    another try.
    """
    with runtime.session() as s:
        ids = store.claim_stale(s, JobStatus.submitting, before, SWEEP_BATCH)
        now = utcnow()
        for job_id in ids:
            store.transition(
                s,
                job_id,
                {JobStatus.submitting},
                now,
                status=JobStatus.failed.value,
                finished_at=now,
                error_code="submit_interrupted",
                error_message="the worker stopped while submitting; the Modellix task may exist "
                "but its id is unknown, so the job is not submitted again",
            )
    if ids:
        log.warning("%d jobs interrupted during submission marked failed: %s", len(ids), ", ".join(ids[:20]))
    return len(ids)
