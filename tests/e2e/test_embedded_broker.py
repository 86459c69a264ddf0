"""An embedded worker process killed while it holds messages."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from models.migrate import upgrade
from tests.support.cli import embedded_env
from tests.support.embedded import ENQUEUE, messages, unacked_messages
from tests.support.jobs import wait_for, wait_terminal
from worker.dev.jobs import valid
from worker.dev.processes import ROOT, Worker


@pytest.mark.slow
def test_an_embedded_worker_killed_while_holding_messages_loses_no_job(tmp_path, sandbox):
    sandbox.set_faults(latency=0.3)
    env = embedded_env(
        tmp_path,
        MODELLIX_BASE_URL=sandbox.url,
        MODELLIX_API_KEY=sandbox.api_key,
        KLING_POLL_FIRST="0.3",
        KLING_POLL_MAX="1",
        MODELLIX_CONNECT_TIMEOUT="1",
        MODELLIX_READ_TIMEOUT="3",
        KLING_SUBMIT_GRACE="10",
    )
    home = tmp_path / "home"
    home.mkdir()
    database = f"sqlite:///{home / 'jobs.sqlite'}"
    upgrade(database)
    tag = uuid.uuid4().hex[:6]
    # Some jobs come with a countdown: the worker holds those in memory until they are due,
    # as it holds a retry; the rest fill its threads and its prefetch.
    later = [{"kwargs": valid(f"{tag}-eta", i), "countdown": 8} for i in range(4)]
    now = [{"kwargs": valid(tag, i)} for i in range(36)]
    jobs = {m["kwargs"]["job_id"] for m in later + now}

    unacked = home / "broker" / "unacked"

    def holding() -> bool:
        """The victim holds its countdown messages, and it is submitting jobs from the line."""
        held = unacked_messages(unacked)
        countdowns = sum(1 for m in held if m["headers"].get("eta"))
        return countdowns == len(later) and sandbox.stats()["submits"] >= 4

    workers = [Worker(env, tmp_path, concurrency=4).wait_ready()]
    try:
        subprocess.run(
            [sys.executable, "-c", ENQUEUE],
            input="".join(json.dumps(m) + "\n" for m in later + now),
            text=True,
            env=env,
            cwd=ROOT,
            check=True,
            timeout=60,
        )
        # On kombu's own transport the victim's folder stays empty (it deletes on read): this fails here.
        wait_for(holding, 30, "the victim holding messages while it submits", workers)
        workers[0].kill()
        assert sandbox.stats()["submits"] < len(jobs), "the kill must land mid-batch"

        workers.append(Worker(env, tmp_path, concurrency=4, beat=True).wait_ready())
        found = wait_terminal(database, len(jobs), 120, workers)
    finally:
        for worker in workers:
            worker.stop()
    assert set(found) == jobs
    outcomes = {(j.status, j.error_code) for j in found.values()}
    # A job caught between `submitting` and its answer fails loudly rather than risk a second submission.
    assert outcomes <= {("succeeded", None), ("failed", "submit_interrupted")}
    assert sum(j.status == "succeeded" for j in found.values()) >= len(jobs) - 4  # one POST per victim thread
    stats = sandbox.stats()
    assert stats["duplicate_prompts"] == 0  # no job submitted twice
    assert stats["submits"] <= len(jobs)
    assert messages(unacked) == [] and list((home / "broker" / "bad").iterdir()) == []
