"""Helpers shared by the integration tests: worker settings, reading the job table, waiting."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import Session

from models import TERMINAL, ApiBudget, JobStatus
from models.job import Job, utcnow
from worker import resources, submission
from worker.dev.processes import Worker
from worker.dev.sandbox import SandboxServer
from worker.fleet import limits


def worker_env(broker: str, database: str, sandbox: SandboxServer, tmp_path: Path, **extra: Any) -> dict[str, str]:
    env = {
        "CELERY_BROKER_URL": broker,
        "DATABASE_URL": database,
        "MODELLIX_BASE_URL": sandbox.url,
        "MODELLIX_API_KEY": sandbox.api_key,
        "KLING_QUEUE": f"kling-test-{uuid.uuid4().hex[:8]}",
        "KLING_HOME": str(tmp_path / "home"),
        "KLING_POLL_FIRST": "0.3",
        "KLING_POLL_MAX": "1",
        "KLING_SWEEP_INTERVAL": "1",
        # Short timeouts so that the grace after which the sweep fails an interrupted submit
        # can be short too (it must outlast a live submit: 5 s budget wait + connect + read).
        "MODELLIX_CONNECT_TIMEOUT": "1",
        "MODELLIX_READ_TIMEOUT": "3",
        "KLING_SUBMIT_GRACE": "10",
        "KLING_BACKOFF_BASE": "0.2",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def rows(database: str) -> dict[str, Job]:
    engine = create_engine(database.replace("postgresql://", "postgresql+psycopg://"))
    with Session(engine) as s:
        found = {j.id: j for j in s.scalars(select(Job))}
    engine.dispose()
    return found


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


def audit(sandbox: SandboxServer, sent: Sequence[dict[str, Any]], found: dict[str, Job]) -> dict[str, Any]:
    """What a fault cost: jobs lost (no row or not ended), duplicate submissions, and orphaned tasks
    (created by the API, so billed, but not the task of a job that succeeded)."""
    followed = {j.modellix_task_id for j in found.values() if j.status == "succeeded"}
    ended = {job_id for job_id, j in found.items() if j.status in TERMINAL}
    return {
        "lost": sorted(m["job_id"] for m in sent if m["job_id"] not in ended),
        "duplicates": sandbox.stats()["duplicate_prompts"],
        "orphaned": len(sandbox.task_ids() - followed),
        "outcomes": sorted({(j.status, j.error_code) for j in found.values()}, key=str),
    }


def valid(tag: str, i: int) -> dict:
    return {
        "request": {
            "prompt": f"{tag} picture {i} of <<<image_1>>>",
            "n": 1 + i % 2,
            "image_list": [{"image": f"https://img.example/{i}.png"}],
        },
        "job_id": f"{tag}-{i}",
        "metadata": {"i": i},
    }


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
    return submission.handle((), kwargs, "delivery-1")


def submitted(job_id: str) -> Job:
    out = handle(request={"prompt": f"picture {job_id}"}, job_id=job_id)
    assert out.status is JobStatus.submitted
    return job(job_id)


def set_budget(**values: Any) -> None:
    """Write the shared budget row as another worker (or host) would."""
    with resources.get().transaction() as s:
        s.execute(update(ApiBudget).values(**values))


def budget() -> dict[str, Any]:
    with resources.get().transaction() as s:
        return limits.status(s)


def seconds_until(when: datetime) -> float:
    return (when - utcnow()).total_seconds()
