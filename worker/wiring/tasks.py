"""Celery tasks: orchestration only. The work lives in submission (a message, a submit) and tracking
(a poll); each process's submit threads in worker.wiring.dispatcher.

A worker asked to stop (SIGTERM, a warm shutdown) stops taking jobs from the line and finishes the
submits it has started; threads holding an answer through a database outage hand it on in a
message; then its scheduled polls go to the other workers through the broker, each due when it
would have been here (`hand_over`).
"""

from __future__ import annotations

import logging
from typing import Any, assert_never

from celery import Task
from kombu.exceptions import OperationalError

from models import JobStatus
from worker import facts, resources, submission
from worker.fleet import pause
from worker.ops import cpu
from worker.polling import learning, schedule, tracking
from worker.results import delivery
from worker.wiring import dispatcher
from worker.wiring.app import app

log = logging.getLogger("kling_worker.tasks")

# How long a stopping worker waits for its polls in progress before handing the rest over.
HAND_OVER_WAIT = 10.0


@app.task(name="kling.generate", bind=True, max_retries=None)
def generate(self: Task, *args: Any, **kwargs: Any) -> str | None:
    res = resources.get()
    outcome = submission.handle(res, args, kwargs, self.request.id, self.request.retries)
    if isinstance(outcome.next_step, submission.Retry):
        # The database is away: a new message with the same id and arguments; this one is acked.
        raise self.retry(countdown=outcome.next_step.after)
    carry_on(res, outcome)
    if outcome.status is JobStatus.queued:
        dispatcher.nudge()
    return outcome.status.value if outcome.status else None


def carry_on(res: resources.Resources, outcome: submission.Outcome) -> None:
    """What comes after a message or a submit (but a Retry, which only a message has): follow the
    submitted task, or hand on a fact the database has not taken."""
    next_step = outcome.next_step
    match next_step:
        case submission.HandOn(fact):
            # The database has not taken a fact (an answer, a claim) before this process had to let go.
            # A claim carried through an outage is routine; an answer is worth a line.
            level = logging.DEBUG if isinstance(fact, facts.Claimed) else logging.INFO
            log.log(
                level,
                "job %s: its %s fact travels on in a message",
                outcome.job_id,
                fact.kind,
                extra={"event": "fact_carried", "job_id": outcome.job_id},
            )
            generate.apply_async(kwargs={"job_id": outcome.job_id, submission.CARRIED: fact.to_json()})
        case submission.Follow(first_poll):
            follow_later(res, outcome.job_id, first_poll)
        case submission.Finished() | submission.Retry():
            pass
        case _:
            assert_never(next_step)


@app.task(name="kling.poll", bind=True, max_retries=None)
def redispatched_poll(self: Task, job_id: str, seq: int, fact: dict[str, Any] | None = None) -> None:
    """A poll whose worker is gone (from the sweep or a stopping worker); this process follows the job now.

    With `fact`, a finished task's result that a stopping worker could not write: write it instead.
    """
    res = resources.get()
    if fact is None:
        _follow(res, job_id, seq)
    elif facts.keep(res, facts.from_json(fact)) is facts.Kept.to_hand_on:
        raise self.retry(countdown=0)  # this process is stopping too: the next one writes it


@app.task(name="kling.sweep")
@cpu.timed("sweep")
def sweep() -> int:
    res = resources.get()
    overdue = tracking.sweep(res)
    for job_id, seq in overdue:
        redispatched_poll.apply_async(kwargs={"job_id": job_id, "seq": seq})
    due = delivery.due(res)
    for delivery_id in due:
        deliver.apply_async(kwargs={"delivery_id": delivery_id})
    pause.watch_balance(res)
    return len(overdue) + len(due)


@app.task(name="kling.deliver")
def deliver(delivery_id: int) -> None:
    """Carry out one row of the outbox: archive a job's images, or send its event (worker.results.delivery)."""
    carry_out(resources.get(), [delivery_id])


@cpu.timed("deliver")
def carry_out(res: resources.Resources, todo: list[int]) -> None:
    """Carry out claimed outbox rows, then the events an archive released, here and now."""
    while todo:
        current = todo.pop(0)
        done = delivery.deliver(res, current)
        todo += done.then
        if done.callback is None:
            continue
        callback = done.callback
        try:
            app.send_task(callback.task, kwargs={"event": callback.event}, queue=callback.queue)
        except (OSError, OperationalError) as exc:
            delivery.not_sent(res, current, f"the broker refused the callback: {exc}")
            continue
        delivery.sent(res, current)


def follow(job_id: str, seq: int) -> None:
    """Make poll `seq` of a job, then schedule the next one on this process's poll timer (the
    timer's entry point: what it runs, and what `hand_over` sends to the other workers)."""
    _follow(resources.get(), job_id, seq)


def _follow(res: resources.Resources, job_id: str, seq: int) -> None:
    outcome = tracking.check(res, job_id, seq)
    match outcome:
        case tracking.PollAgain(poll):
            follow_later(res, job_id, poll)
        case tracking.HandOn(fact):
            log.info(
                "job %s: its %s result travels on in a message (the database is away)",
                job_id,
                fact.kind,
                extra={"event": "result_handed_on", "job_id": job_id},
            )
            redispatched_poll.apply_async(kwargs={"job_id": job_id, "seq": seq, "fact": fact.to_json()})
        case tracking.Ended(notify=True):
            # This poll ended a job that has events: they are sent here at once, not after a sweep
            # and a message (its images were archived before the end was written). The sweep still
            # hands out any row this process does not take (it died, the row was not due).
            carry_out(res, delivery.claim_ended(res, job_id))
        case tracking.Ended() | tracking.Skipped():
            pass  # no more polls, nothing to send
        case _:
            assert_never(outcome)


def follow_later(res: resources.Resources, job_id: str, poll: schedule.NextPoll) -> None:
    res.poller.schedule(poll.delay, follow, job_id, poll.seq)


def hand_over(res: resources.Resources) -> int:
    """Send the polls this process has scheduled to the other workers; how many were sent.

    Runs at worker_shutdown (worker.wiring.signals), after the last task ended. The submit threads
    stop first and finish the submits they started, so those have scheduled their first polls.
    Without it, another worker takes a job over only when its poll is OVERDUE_SLACK late (tracking.sweep).
    """
    dispatcher.stop(HAND_OVER_WAIT)
    poller = res.poller_if_started
    if poller is None:
        learning.flush(res)
        return 0
    left = poller.drain(HAND_OVER_WAIT)
    learning.flush(res)  # what this process's polls taught about task durations, before it goes
    polls = [(delay, args) for delay, fn, args in left if fn is follow]
    sent = 0
    try:
        for delay, (job_id, seq) in polls:
            redispatched_poll.apply_async(kwargs={"job_id": job_id, "seq": seq}, countdown=delay)
            sent += 1
    except (OSError, OperationalError) as exc:
        log.warning(
            "stopping: the broker took %d of %d scheduled polls (%s); the sweep re-dispatches the rest "
            "when they are %.0fs overdue",
            sent,
            len(polls),
            exc,
            tracking.OVERDUE_SLACK,
            extra={"event": "hand_over_incomplete"},
        )
        return sent
    if polls:
        log.info(
            "stopping: handed %d scheduled polls over to the other workers", sent, extra={"event": "polls_handed_over"}
        )
    return sent
