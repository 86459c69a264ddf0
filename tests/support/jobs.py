"""Waiting for the job table or any condition with a deadline, and reading and driving this process's
runtime once the `service` fixture configured it as a worker. What bench/ needs too (the messages,
a worker's environment, reading the table, the audit) is in worker.dev.jobs."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import update

from models import TERMINAL, ApiBudget, JobStatus
from models.job import Job, utcnow
from worker import resources, submission
from worker.cli import fleet
from worker.dev.jobs import rows
from worker.dev.processes import Worker


def wait_terminal(database: str, count: int, timeout: float, workers: list[Worker]) -> dict[str, Job]:
    deadline = time.monotonic() + timeout
    found: dict[str, Job] = {}
    while time.monotonic() < deadline:
        found = rows(database)
        if len(found) >= count and all(j.status in TERMINAL for j in found.values()):
            return found
        time.sleep(0.3)
    statuses = {j.id: j.status for j in found.values() if j.status not in TERMINAL}
    logs = "\n".join(w.output() for w in workers)
    pytest.fail(f"{len(found)}/{count} rows, not terminal: {statuses}\n{logs}")


def wait_for(condition: Callable[[], Any], timeout: float, what: str, workers: Sequence[Worker] = ()) -> Any:
    """Poll `condition` until it returns something true; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        if time.monotonic() > deadline:
            logs = "\n".join(w.output() for w in workers)
            pytest.fail(f"not within {timeout:.0f}s: {what}\n{logs}")
        time.sleep(0.1)


# -- in-process helpers (the `service` fixture configures this process as a worker) --


def job(job_id: str) -> Job:
    with resources.get().transaction() as s:
        return s.get(Job, job_id)


def handle(**kwargs: Any) -> submission.Outcome:
    """A `kling.generate` message as a worker takes it: its job queued, then (if it was) one turn of
    this process's submit thread: the next job taken from the line and sent. The line is expected to
    hold only this job; the outcome is the send's, or the message's if nothing was queued."""
    out = submission.handle(resources.get(), (), kwargs, "message-1")
    if out.status is not JobStatus.queued:
        return out
    sent = take_and_send()
    assert sent is not None, "the job was queued, but no job could be taken from the line"
    return sent


def take_and_send() -> submission.Outcome | None:
    """One turn of this process's submit thread: the next job taken from the line and sent (None: none)."""
    res = resources.get()
    taken = submission.take_next(res)
    if taken is None or isinstance(taken, submission.Outcome):
        return taken
    return submission.send(res, taken)


def due_in(job_id: str) -> float:
    """How long after it was sent back a queued job may be taken again (its retry's delay)."""
    row = job(job_id)
    assert row.due_at is not None, f"{job_id}: not waiting for a retry"
    return (row.due_at - row.updated_at).total_seconds()


def make_due(job_id: str) -> None:
    """Let a job sent back for a retry be taken now, as if its delay had run out."""
    with resources.get().transaction() as s:
        s.execute(update(Job).where(Job.id == job_id).values(due_at=utcnow()))


def submitted(job_id: str) -> Job:
    out = handle(request={"prompt": f"picture {job_id}"}, job_id=job_id)
    assert out.status is JobStatus.submitted
    return job(job_id)


def set_budget(**values: Any) -> None:
    """Write the shared budget row as another worker (or host) would."""
    with resources.get().transaction() as s:
        s.execute(update(ApiBudget).values(**values))


def budget() -> dict[str, Any]:
    res = resources.get()
    with res.transaction() as s:
        return fleet.status(res.settings, s)


def seconds_until(when: datetime) -> float:
    return (when - utcnow()).total_seconds()
