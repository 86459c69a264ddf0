"""Celery tasks: orchestration only. The work lives in submission (a message) and tracking (a poll)."""

from __future__ import annotations

from typing import Any

from celery import Task
from sqlalchemy.exc import OperationalError

from worker import runtime, schedule, submission, tracking
from worker.app import app

# The database being briefly unreachable must not cost a job: the message is
# retried (kept on the broker) with backoff until it comes back.
_INFRA: dict[str, Any] = {
    "autoretry_for": (OperationalError,),
    "retry_backoff": True,
    "retry_backoff_max": 60,
    "retry_jitter": True,
    "max_retries": None,
}


@app.task(name="kling.generate", bind=True, **_INFRA)
def generate(self: Task, *args: Any, **kwargs: Any) -> str | None:
    outcome = submission.handle(args, kwargs, self.request.id, self.request.retries)
    if outcome.retry_in is not None:
        # A new message with the same id and arguments; this one is acked.
        raise self.retry(countdown=outcome.retry_in)
    if outcome.first_poll is not None:
        follow_later(outcome.job_id, outcome.first_poll)
    return outcome.status.value if outcome.status else None


@app.task(name="kling.poll", **_INFRA)
def redispatched_poll(job_id: str, seq: int) -> None:
    """A poll the sweep re-dispatched (its worker is gone); this process follows the job from here on."""
    follow(job_id, seq)


@app.task(name="kling.sweep")
def sweep() -> int:
    overdue = tracking.sweep()
    for job_id, seq in overdue:
        redispatched_poll.apply_async(kwargs={"job_id": job_id, "seq": seq})
    return len(overdue)


def follow(job_id: str, seq: int) -> None:
    """Make poll `seq` of a job, then schedule the next one on this process's poll timer."""
    following = tracking.check(job_id, seq)
    if following is not None:
        follow_later(job_id, following)


def follow_later(job_id: str, poll: schedule.NextPoll) -> None:
    runtime.get().poller.schedule(poll.delay, follow, job_id, poll.seq)
