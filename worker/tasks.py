"""Celery tasks: orchestration only; the work lives in submission and tracking."""

from __future__ import annotations

from typing import Any

from celery import Task
from sqlalchemy.exc import OperationalError

from worker import poller, runtime, submission, tracking
from worker.app import app

# The database being briefly unreachable must not cost a job: the message is
# retried (kept on the broker) with backoff until it comes back.
_INFRA = {
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
    if outcome.first_poll_in is not None:
        _poller().schedule(outcome.job_id, 0, outcome.first_poll_in)
    return outcome.status.value if outcome.status else None


@app.task(name="kling.poll", **_INFRA)
def poll(job_id: str, seq: int) -> None:
    """A poll re-dispatched by the sweep; this process follows the job from here on."""
    following = tracking.poll(job_id, seq)
    if following is not None:
        _poller().schedule(job_id, *following)


@app.task(name="kling.sweep")
def sweep() -> int:
    overdue = tracking.sweep()
    for job_id, seq in overdue:
        poll.apply_async(kwargs={"job_id": job_id, "seq": seq})
    return len(overdue)


def _poller() -> poller.Poller:
    return poller.get(tracking.poll, runtime.settings().concurrency)
