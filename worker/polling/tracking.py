"""Following a submitted Modellix task until it ends, and the sweep that repairs what was lost. No Celery here.

`check` makes one poll of a job (the schedule is worker.polling.schedule's, learned
per request shape by worker.polling.learning from what each poll found) and says what
follows (a PollOutcome: poll again then, hand a result on, the job ended, or nothing).
The submitting worker's own timer (worker.polling.timer) runs the checks; nothing
relies on that process alone: the periodic `sweep` re-dispatches any active job whose
poll is overdue (worker killed or restarted) through the broker, and the poll token in
the row (models.store.claim_poll) keeps two workers from polling one job at once.
A finished task's result is written as a Fact (worker.facts): a database
outage delays it but cannot make the worker drop it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeAlias

from models import JobStatus, lifecycle, store
from models.job import utcnow
from worker import facts, modellix
from worker.config import Settings
from worker.facts import Fact, Kept, Succeeded, TaskFailed
from worker.fleet import slots
from worker.fleet.pause import pause_fleet
from worker.fleet.waiting import OverBudget
from worker.modellix import TaskPhase
from worker.modellix.policy import SUBMIT_INTERRUPTED, Action, judge_poll
from worker.ops import cpu, logs, metrics, outages
from worker.polling import learning, schedule
from worker.resources import Resources
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


# -- what a poll leads to -------------------------------------------------------


@dataclass(frozen=True)
class PollAgain:
    """The job is still running (or this poll was put off): make poll `poll.seq` in `poll.delay` seconds."""

    poll: schedule.NextPoll


@dataclass(frozen=True)
class HandOn:
    """A finished task's result the database has not taken before this process began to stop:
    the caller hands it on in a message, for another worker to write."""

    fact: Fact


@dataclass(frozen=True)
class Ended:
    """The job has ended (this poll ended it, or found it ended); `notify`: it has a webhook or a
    callback, so its events are due now, for the caller to send."""

    job_id: str
    notify: bool


@dataclass(frozen=True)
class Skipped:
    """This poll was not this process's to make: the job is no longer active, or its poll number has
    moved on (a stale or duplicate message, or another worker holds the poll)."""


PollOutcome: TypeAlias = PollAgain | HandOn | Ended | Skipped


# -- one poll -------------------------------------------------------------------


def check(res: Resources, job_id: str, seq: int) -> PollOutcome:
    """Make poll number `seq` of a job and say what follows it."""
    with logs.bound(job_id=job_id), cpu.phase("poll"):
        outcome = _check(res, job_id, seq)
    if not isinstance(outcome, PollAgain):
        learning.forget(res, job_id)
    return outcome


def _check(res: Resources, job_id: str, seq: int) -> PollOutcome:
    cfg = res.settings
    now = utcnow()
    token = seq  # the poll number the row expects next
    try:
        with res.statement() as ex:
            claim = store.claim_poll(ex, job_id, seq, now, _lease(cfg))
        if claim is None:
            return Skipped()
        token = seq + 1
        logs.bind(modellix_task_id=claim.task_id)
        deadline = schedule.deadline(claim.submitted_at, cfg)
        next_poll = schedule.NextPoll(seq + 1, schedule.gap(seq + 1, cfg, learning.learned(res, job_id)))
        try:
            # The slot is taken right before the request, so the spacing holds at the API.
            slots.take_request_slot(res)
            state = res.client.get_task(claim.task_id)
        except OverBudget as exc:
            # This poll did not happen: give its number back and try again later. A job that is past its
            # deadline ends here, and leaves its events (if any) to the sweep.
            given_back = _next(res, job_id, schedule.NextPoll(seq, exc.retry_in), now, deadline, give_back=True)
            return _ended(job_id, given_back, notify=False)
        except modellix.ModellixError as exc:
            return _ended(job_id, _after_error(res, job_id, exc, next_poll, now, deadline), claim.notify)
        finished = state.phase in (TaskPhase.succeeded, TaskPhase.failed)
        learning.answered(res, job_id, seq, (now - claim.submitted_at).total_seconds(), finished)
        return _ended(job_id, _record(res, job_id, state, next_poll, now, deadline), claim.notify)
    except Exception as exc:
        # Nothing learned is lost here: a finished result is held by _record, not raised.
        res.put_off(exc, "polls")
        return PollAgain(schedule.NextPoll(token, outages.OUTAGE_RECHECK))


def _ended(job_id: str, outcome: PollAgain | HandOn | None, notify: bool) -> PollOutcome:
    """`outcome`, or, where the steps below say None (no more polls: the job has ended), Ended."""
    # Only a job with a webhook or callback has rows for the caller to claim at its end:
    # the others are spared a statement that would find none.
    return Ended(job_id, notify) if outcome is None else outcome


def _record(
    res: Resources,
    job_id: str,
    state: modellix.TaskState,
    next_poll: schedule.NextPoll,
    now: datetime,
    deadline: datetime,
) -> PollAgain | HandOn | None:
    phase = state.phase
    if phase is TaskPhase.succeeded:
        if state.result_urls:
            at = utcnow()
            # Its images are kept before the end is written, so the end is one write with its files.
            files, archived = delivery.archive_at_end(res, job_id, state.result_urls)
            outcome = _keep(res, Succeeded(job_id, at, state.result_urls, state.raw, files, archived))
            log.info("job %s succeeded", job_id, extra={"event": "job_succeeded"})
            return outcome
        log.info("job %s failed: no results", job_id, extra={"event": "job_failed"})
        message = f"task {state.task_id} succeeded without any http(s) result URL"
        return _fail(res, job_id, "no_results", message, state.raw)
    if phase is TaskPhase.failed:
        log.info("job %s failed: task_failed", job_id, extra={"event": "job_failed"})
        return _fail(res, job_id, "task_failed", state.error_message, state.raw)
    if not state.known_status:
        log.warning(
            "job %s: unknown Modellix status %r, treated as still running",
            job_id,
            state.status,
            extra={"event": "unknown_status"},
        )
    return _next(res, job_id, next_poll, now, deadline, running=phase is TaskPhase.running, answer=state.raw)


def _keep(res: Resources, fact: Fact) -> HandOn | None:
    """Write a finished task's result: None once the job table has it, else HandOn."""
    return None if facts.keep(res, fact) is Kept.written else HandOn(fact)


def _fail(
    res: Resources, job_id: str, code: str, message: str, answer: dict[str, object] | None = None
) -> HandOn | None:
    return _keep(res, TaskFailed(job_id, utcnow(), code, message, answer))


def _after_error(
    res: Resources,
    job_id: str,
    exc: modellix.ModellixError,
    next_poll: schedule.NextPoll,
    now: datetime,
    deadline: datetime,
) -> PollAgain | HandOn | None:
    verdict = judge_poll(exc, next_poll.delay, res.settings)
    if verdict.pause:
        pause_fleet(res, verdict.pause, verdict.pause_reason)
    if verdict.action is Action.fail:
        log.warning("job %s failed: %s %s", job_id, exc.stored_code, exc.message, extra={"event": "job_failed"})
        return _fail(res, job_id, exc.stored_code, exc.message)
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
    return _next(res, job_id, schedule.NextPoll(next_poll.seq, verdict.delay), now, deadline)


def _next(
    res: Resources,
    job_id: str,
    next_poll: schedule.NextPoll,
    now: datetime,
    deadline: datetime,
    *,
    running: bool = False,
    answer: dict[str, object] | None = None,
    give_back: bool = False,
) -> PollAgain | None:
    """Record when the next poll is due (never past the deadline); past the deadline, fail the job.
    None when the job has ended (here, or before)."""
    if now >= deadline:
        with res.transaction() as ex:
            ended = lifecycle.fail_task(
                ex, job_id, utcnow(), "timeout", f"Modellix task not finished by the deadline ({deadline.isoformat()})"
            )
        if ended:
            metrics.job_ended(JobStatus.failed.value, "timeout")
            log.info("job %s failed: timeout", job_id, extra={"event": "job_failed"})
        return None
    delay = min(next_poll.delay, max(0.0, (deadline - now).total_seconds()))
    with res.statement() as ex:
        moved = lifecycle.observe(
            ex,
            job_id,
            now,
            running=running,
            next_poll_at=now + timedelta(seconds=delay),
            answer=answer,
            polls=next_poll.seq if give_back else None,
        )
    return PollAgain(schedule.NextPoll(next_poll.seq, delay)) if moved else None


# -- the sweep ------------------------------------------------------------------


def sweep(res: Resources) -> list[tuple[str, int]]:
    """Periodic repair; returns the (job id, poll number) of the polls to dispatch again.

    - active jobs whose next poll is overdue get it re-dispatched;
    - active jobs past the deadline fail with `timeout` (by their next poll);
    - jobs stuck in `submitting` longer than `submit_grace` (their worker died
      between committing `submitting` and recording the answer) fail with
      `submit_interrupted`, see resolve_interrupted.
    """
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
        resolve_interrupted(res, now - timedelta(seconds=res.settings.submit_grace))
    return list(overdue)


def resolve_interrupted(res: Resources, before: datetime) -> int:
    """Fail jobs left in `submitting` since before `before`.

    Modellix has no idempotency key and no way to look a task up by anything
    but its id, so a job whose POST may or may not have reached Modellix cannot
    be resubmitted without risking a second, billed generation. It fails with
    `submit_interrupted`; the caller re-enqueues under a new job id if it wants
    another try.
    """
    with res.transaction() as s:
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
