"""The batch file sent whole, as RabbitMQ receives it."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.support.cli import GOOD_BATCH, cli_env, delete_queue, drain, run_cli, write_batch


@pytest.fixture
def rabbit_queue(rabbit_url):
    queue = "batch-" + uuid.uuid4().hex[:8]
    yield queue
    delete_queue(rabbit_url, queue)


@pytest.mark.services
def test_a_good_file_is_sent_whole_on_rabbitmq(rabbit_url, rabbit_queue, tmp_path):
    env = cli_env(CELERY_BROKER_URL=rabbit_url, KLING_QUEUE=rabbit_queue, KLING_HOME=str(tmp_path / "home"))
    done = run_cli(["enqueue", "--batch", str(write_batch(tmp_path / "jobs.jsonl", GOOD_BATCH)), "--json"], env)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert [p["line"] for p in printed] == [1, 2, 3]
    assert printed[0]["job_id"] == "batch-1" and printed[2]["job_id"] == "batch-3"
    assert uuid.UUID(printed[1]["job_id"])  # no job_id on the line: the Celery task id is the job id
    assert drain(rabbit_url, rabbit_queue) == [("kling.generate", line) for line in GOOD_BATCH]

    # From standard input, and as a table when not asked for JSON.
    done = run_cli(["enqueue", "--batch", "-"], env, stdin=json.dumps(GOOD_BATCH[0]) + "\n")
    assert done.returncode == 0 and done.stdout.split() == ["line", "job_id", "1", "batch-1"]
    done = run_cli(["enqueue", "a cat", "--job-id", "one-1", "--json"], env)
    assert done.returncode == 0 and json.loads(done.stdout) == {"job_id": "one-1"}
    assert [kwargs["job_id"] for _, kwargs in drain(rabbit_url, rabbit_queue)] == ["batch-1", "one-1"]
