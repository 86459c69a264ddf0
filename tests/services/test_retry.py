"""`kling-worker jobs retry` for real: RabbitMQ and PostgreSQL, the messages read off the queue and handled by
the worker's code; and tests/unit/test_retry.py's database tests again, on PostgreSQL."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import pytest

from tests.support.cli import cli_env, delete_queue, drain, run_cli
from tests.support.jobs import handle, job
from tests.unit.test_retry import *  # noqa: F403
from tests.unit.test_retry import NOW, add


@pytest.fixture
def fleet(pg_url, rabbit_url, service, configure):
    """This process as a worker on PostgreSQL against the sandbox; the CLI in subprocesses, sending to RabbitMQ."""
    queue = "retry-" + uuid.uuid4().hex[:8]
    configure(DATABASE_URL=pg_url, CELERY_BROKER_URL=rabbit_url, KLING_QUEUE=queue)
    env = cli_env(DATABASE_URL=pg_url, CELERY_BROKER_URL=rabbit_url, KLING_QUEUE=queue)
    yield env
    delete_queue(rabbit_url, queue)


def cli_json(env: dict[str, str], *args: str) -> tuple[int, Any]:
    done = run_cli([*args, "--json"], env)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout) if done.stdout else None


@pytest.mark.services
def test_a_retry_is_a_new_linked_job_and_a_second_run_sends_none(fleet, rabbit_url, service):
    callback = {"task": "orders.ready", "queue": "orders"}
    add("f1", error_code="429", meta={"order": 1}, callback=callback, created_at=NOW - timedelta(minutes=10))
    add("f2", error_code="submit_unknown")

    code, report = cli_json(fleet, "jobs", "retry")
    assert code == 0
    assert [(r["job_id"], r["action"], r["new_job_id"]) for r in report] == [
        ("f2", "skipped", None),
        ("f1", "retried", "f1:retry1"),
    ]
    sent = drain(rabbit_url, fleet["KLING_QUEUE"])
    assert sent == [
        (
            "kling.generate",
            {
                "request": {"prompt": "picture f1"},
                "job_id": "f1:retry1",
                "retry_of": "f1",
                "metadata": {"order": 1},
                "callback": callback,
            },
        )
    ]

    # A second run before any worker took the message sends the same job id: one job whatever happens.
    _, again = cli_json(fleet, "jobs", "retry", "f1")
    assert again[0]["new_job_id"] == "f1:retry1"
    duplicate = drain(rabbit_url, fleet["KLING_QUEUE"])
    for _, kwargs in sent + duplicate:
        handle(**kwargs)  # the worker's own code, as `kling.generate` runs it
    assert service.stats()["submits"] == 1
    retried = job("f1:retry1")
    assert (retried.retry_of, retried.status, retried.meta) == ("f1", "submitted", {"order": 1})
    assert retried.callback == callback

    # Once the retry is recorded, the original is skipped unless forced.
    code, report = cli_json(fleet, "jobs", "retry", "f1")
    assert code == 1 and report[0]["reason"] == "already retried as f1:retry1 (--force to retry anyway)"
    assert drain(rabbit_url, fleet["KLING_QUEUE"]) == []
    code, report = cli_json(fleet, "jobs", "retry", "f1", "--force")
    assert code == 0 and report[0]["new_job_id"] == "f1:retry2"
    assert [k["job_id"] for _, k in drain(rabbit_url, fleet["KLING_QUEUE"])] == ["f1:retry2"]

    # The ambiguous one goes only with --force, and says it was forced.
    code, report = cli_json(fleet, "jobs", "retry", "f2", "--force")
    assert code == 0 and report[0]["action"] == "retried" and report[0]["reason"].startswith("forced: submit_unknown")
    [(_, kwargs)] = drain(rabbit_url, fleet["KLING_QUEUE"])
    handle(**kwargs)

    _, shown = cli_json(fleet, "jobs", "show", "f1")
    assert shown["retried_as"] == ["f1:retry1"] and shown["retry_of"] is None
    _, shown = cli_json(fleet, "jobs", "show", "f2:retry1")
    assert shown["retry_of"] == "f2"
    text = run_cli(["jobs", "show", "f2:retry1"], fleet).stdout
    assert "retry_of: f2" in text
