"""Following a submitted Modellix task until it ends, and the sweep that repairs what was lost. No Celery here.

`check` makes one poll of a job (the schedule is worker.polling.schedule's, learned
per request shape by worker.polling.learning from what each poll found) and says when
the next is due. The submitting worker's own timer (worker.polling.timer) runs
the checks; nothing relies on that process alone: the periodic `sweep`
re-dispatches any active job whose poll is overdue (worker killed or
restarted) through the broker, and the poll token in the row
(models.store.claim_poll) keeps two workers from polling one job at once.
A finished task's result is written as a Fact (worker.facts): a database
outage delays it but cannot make the worker drop it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from models import JobStatus, lifecycle, store
from models.job import utcnow
from worker import facts, modellix, resources
from worker.config import Settings
from worker.facts import Fact
from worker.fleet import limits
from worker.modellix import TaskPhase
from worker.modellix.policy import SUBMIT_INTERRUPTED, Action, judge_poll
from worker.ops import cpu, logs, metrics, outages
from worker.polling import learning, schedule
from worker.results import delivery

log = logging.getLogger("kling_worker.tracking")

# How late a scheduled poll may be before the sweep assumes its worker is gone.
OVERDUE_SLACK = 10.0
SWEEP_BATCH = 500
# The sweep fails a stale submit only once the database has been back this long in its
# process: answers held through an outage land within facts.MAX_RETRY of its return.
AFTER_OUTAGE = 3 * facts.MAX_RETRY


def _lease(cfg: Settings) -> float:
    """How long a claimed poll may take before the sweep gives it to another worker."""
    return cfg.connect_timeout + cfg.read_timeout + OVERDUE_SLACK


@dataclass(frozen=True)
class Ended:
    """This poll ended a job that has a webhook or a callback: its events are due, for the caller to send."""

    job_id: str


def check(job_id: str, seq: int) -> schedule.NextPoll | Fact | Ended | None:
    """Make poll number `seq` of a job: the next poll, or None when the job needs no more
    (Ended when it has events to send now).

    A Fact is a finished task's result that the database has not taken before
    this process began to stop: the caller hands it on.
    """
    with logs.bound(job_id=job_id), cpu.phase("poll"):
        following = _check(job_id, seq)
    if not isinstance(following, schedule.NextPoll):
        learning.forget(job_id)
    return following


def _check(job_id: str, seq: int) -> schedule.NextPoll | Fact | Ended | None:
    res = resources.get()
    cfg = res.settings
    now = utcnow()
    token = seq  # the poll number the row expects next
    try:
        with res.statement() as ex:
            claimed = store.claim_poll(ex, job_id, seq, now, _lease(cfg))
        if claimed is None:
            return None  # finished, or another worker holds this poll
        token = seq + 1
        task_id, submitted_at, notify = claimed
        logs.bind(modellix_task_id=task_id)
        deadline = schedule.deadline(submitted_at, cfg)
        gap = schedule.gap(seq + 1, cfg, learning.learned(job_id))
        try:
            # The slot is taken right before the request, so the spacing holds at the API.
            limits.take_request_slot()
            state = res.client.get_task(task_id)
        except limits.OverBudget as exc:
            # This poll did not happen: give its number back and try again later.
            return _next(job_id, schedule.NextPoll(seq, exc.retry_in), now, deadline, give_back=True)
        except modellix.ModellixError as exc:
            failed = _after_error(job_id, exc, schedule.NextPoll(seq + 1, gap), now, deadline)
            return _ended(job_id, failed, notify)
        ended = state.phase in (TaskPhase.succeeded, TaskPhase.failed)
        learning.answered(job_id, seq, (now - submitted_at).total_seconds(), ended)
        return _ended(job_id, _record(job_id, state, schedule.NextPoll(seq + 1, gap), now, deadline), notify)
    except Exception as exc:
        # Nothing learned is lost here: a finished result is held by _record, not raised.
        res.put_off(exc, "polls")
        return schedule.NextPoll(token, outages.RETRY_AFTER)


def _ended(
    job_id: str, following: schedule.NextPoll | Fact | None, notify: bool
) -> schedule.NextPoll | Fact | Ended | None:
    # Only a job with a webhook or callback has rows for the caller to claim at its end:
    # the others are spared a statement that would find none.
    return Ended(job_id) if following is None and notify else following


def _record(
    job_id: str, state: modellix.TaskState, following: schedule.NextPoll, now: datetime, deadline: datetime
) -> schedule.NextPoll | Fact | None:
    phase = state.phase
    if phase is TaskPhase.succeeded:
        if state.result_urls:
            at = utcnow()
            # Its images are kept before the end is written, so the end is one write with its files.
            files, archived = delivery.archive_at_end(job_id, state.result_urls)
            values = {
                "result_urls": state.result_urls,
                "answer": state.raw,
                "files": files,
                "archived": archived.to_json(),
            }
            held = facts.keep(Fact(job_id, "succeeded", at, values))
            log.info("job %s succeeded", job_id, extra={"event": "job_succeeded"})
            return held
        log.info("job %s failed: no results", job_id, extra={"event": "job_failed"})
        message = f"task {state.task_id} succeeded without any http(s) result URL"
        return _fail(job_id, "no_results", message, state.raw)
    if phase is TaskPhase.failed:
        log.info("job %s failed: task_failed", job_id, extra={"event": "job_failed"})
        return _fail(job_id, "task_failed", state.error_message, state.raw)
    if not state.known_status:
        log.warning(
            "job %s: unknown Modellix status %r, treated as still running",
            job_id,
            state.status,
            extra={"event": "unknown_status"},
        )
    return _next(job_id, following, now, deadline, running=phase is TaskPhase.running, answer=state.raw)


def _fail(job_id: str, code: str, message: str, answer: dict[str, object] | None = None) -> Fact | None:
    values = {"error_code": code, "error_message": message, "answer": answer}
    return facts.keep(Fact(job_id, "task_failed", utcnow(), values))


def _after_error(
    job_id: str, exc: modellix.ModellixError, following: schedule.NextPoll, now: datetime, deadline: datetime
) -> schedule.NextPoll | Fact | None:
    verdict = judge_poll(exc, following.delay, resources.settings())
    if verdict.pause:
        limits.pause(verdict.pause, verdict.pause_reason)
    if verdict.action is Action.fail:
        log.warning("job %s failed: %s %s", job_id, exc.stored_code, exc.message, extra={"event": "job_failed"})
        return _fail(job_id, exc.stored_code, exc.message)
    if verdict.account:
        log.error(
            "job %s: Modellix rejects the account while polling (%s); polling slowly",
            job_id,
            exc.message,
            extra={"event": "fleet_paused"},
        )
    else:
        log.info(
            "job %s: poll failed (%s); next poll in %.1fs",
            job_id,
            exc.message,
            verdict.delay,
            extra={"event": "poll_failed"},
        )
    return _next(job_id, schedule.NextPoll(following.seq, verdict.delay), now, deadline)


def _next(
    job_id: str,
    following: schedule.NextPoll,
    now: datetime,
    deadline: datetime,
    *,
    running: bool = False,
    answer: dict[str, object] | None = None,
    give_back: bool = False,
) -> schedule.NextPoll | None:
    """Record when the next poll is due (never past the deadline); past the deadline, fail the job."""
    res = resources.get()
    if now >= deadline:
        with res.transaction() as ex:
            ended = lifecycle.fail_task(
                ex, job_id, utcnow(), "timeout", f"Modellix task not finished by the deadline ({deadline.isoformat()})"
            )
        if ended:
            metrics.job_ended(JobStatus.failed.value, "timeout")
            log.info("job %s failed: timeout", job_id, extra={"event": "job_failed"})
        return None
    delay = min(following.delay, max(0.0, (deadline - now).total_seconds()))
    with res.statement() as ex:
        moved = lifecycle.observe(
            ex,
            job_id,
            now,
            running=running,
            next_poll_at=now + timedelta(seconds=delay),
            answer=answer,
            polls=following.seq if give_back else None,
        )
    return schedule.NextPoll(following.seq, delay) if moved else None


def sweep() -> list[tuple[str, int]]:
    """Periodic repair; returns the (job id, poll number) of the polls to dispatch again.

    - active jobs whose next poll is overdue get it re-dispatched;
    - active jobs past the deadline fail with `timeout` (by their next poll);
    - jobs stuck in `submitting` longer than `submit_grace` (their worker died
      between committing `submitting` and recording the answer) fail with
      `submit_interrupted`, see resolve_interrupted.
    """
    res = resources.get()
    now = utcnow()
    try:
        with res.transaction() as s:
            overdue = store.claim_overdue_polls(
                s, now - timedelta(seconds=OVERDUE_SLACK), _lease(res.settings), SWEEP_BATCH
            )
    except Exception as exc:
        res.put_off(exc, "sweeps")
        return []
    if overdue:
        log.warning("re-dispatching %d overdue polls", len(overdue), extra={"event": "polls_redispatched"})
    # Right after an outage, a submit's answer may still be on its way from a held fact.
    if res.outage.quiet_for() >= AFTER_OUTAGE:
        resolve_interrupted(now - timedelta(seconds=res.settings.submit_grace))
    return list(overdue)


def resolve_interrupted(before: datetime) -> int:
    """Fail jobs left in `submitting` since before `before`.

    Modellix has no idempotency key and no way to look a task up by anything
    but its id, so a job whose POST may or may not have reached Modellix cannot
    be resubmitted without risking a second, billed generation. It fails with
    `submit_interrupted`; the caller re-enqueues under a new job id if it wants
    another try.
    """
    with resources.get().transaction() as s:
        ids = store.claim_stale(s, JobStatus.submitting, before, SWEEP_BATCH)
        now = utcnow()
        ended = sum(
            lifecycle.fail_submit(
                s,
                job_id,
                now,
                SUBMIT_INTERRUPTED,
                "the worker stopped while submitting; the Modellix task may exist "
                "but its id is unknown, so the job is not submitted again",
            )
            for job_id in ids
        )
    metrics.job_ended(JobStatus.failed.value, SUBMIT_INTERRUPTED, ended)
    if ids:
        log.warning(
            "%d jobs interrupted during submission marked failed: %s",
            len(ids),
            ", ".join(ids[:20]),
            extra={"event": "submits_interrupted"},
        )
    return len(ids)
