"""Jobs for test and benchmark runs: the messages they send, a worker's environment against the
sandbox, the job table as a test reads it, and the audit of what a fault cost (jobs lost, duplicate
submissions, orphaned tasks). Shared by tests/ and bench/, so neither imports the other."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from models import TERMINAL
from models.job import Job
from worker.dev.sandbox import SandboxServer


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


def valid(tag: str, i: int) -> dict[str, Any]:
    return {
        "request": {
            "prompt": f"{tag} picture {i} of <<<image_1>>>",
            "n": 1 + i % 2,
            "image_list": [{"image": f"https://img.example/{i}.png"}],
        },
        "job_id": f"{tag}-{i}",
        "metadata": {"i": i},
    }
