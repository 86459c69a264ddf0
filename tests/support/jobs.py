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
    return submission.handle(resources.get(), (), kwargs, "message-1")


def retry_in(out: submission.Outcome) -> float:
    """After how long the message is sent again: the outcome must be a plain Retry."""
    assert isinstance(out.next_step, submission.Retry), out.next_step
    return out.next_step.after


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
