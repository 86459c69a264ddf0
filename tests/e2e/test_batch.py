"""A batch recorded by a real worker process and waited for by the CLI."""

from __future__ import annotations

import json

import pytest

from tests.support.cli import GOOD_BATCH, cli_env, delete_queue, run_cli, write_batch
from worker.dev.jobs import worker_env
from worker.dev.processes import Worker


@pytest.mark.services
@pytest.mark.slow
def test_a_batch_is_recorded_by_a_worker_and_waited_for(pg_url, rabbit_url, sandbox, tmp_path):
    env = worker_env(rabbit_url, pg_url, sandbox, tmp_path)
    worker = Worker(env, tmp_path, concurrency=4).wait_ready()
    try:
        file = write_batch(tmp_path / "jobs.jsonl", GOOD_BATCH)
        done = run_cli(["enqueue", "--batch", str(file), "--wait", "--timeout", "60", "--json"], cli_env(**env))
    finally:
        worker.stop()
    assert done.returncode == 0, done.stderr + worker.output()
    rows = json.loads(done.stdout)
    assert [r["status"] for r in rows] == ["succeeded"] * 3
    assert rows[0]["id"] == "batch-1" and rows[0]["metadata"] == {"row": 1} and len(rows[0]["result_urls"]) == 2
    assert rows[2]["callback"] == {"task": "orders.ready", "queue": "orders"}
    assert "succeeded" in done.stderr  # the progress, on stderr
    delete_queue(rabbit_url, env["KLING_QUEUE"])
