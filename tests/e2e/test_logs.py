"""The logs of real worker processes: JSON lines about their jobs, and an unknown log format stopping
a worker in one line."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest
from sqlalchemy import create_engine
from sqlalchemy import text as sql

from tests.support.jobs import wait_for, wait_terminal
from tests.support.logs import json_lines
from worker.dev.jobs import valid, worker_env
from worker.dev.processes import ROOT, Worker, produce
from worker.dev.sandbox import Step


@pytest.mark.services
@pytest.mark.slow
def test_a_json_worker_logs_one_object_per_line_with_the_job_it_is_about(rabbit_url, pg_url, sandbox, tmp_path):
    env = worker_env(rabbit_url, pg_url, sandbox, tmp_path, KLING_LOG_FORMAT="json")
    worker = Worker(env, tmp_path, concurrency=4, beat=True).wait_ready()
    ready_at = time.monotonic()
    tag = uuid.uuid4().hex[:6]
    failing, good = valid(tag, 0), valid(tag, 1)
    try:
        # A submit answered with a 400 that echoes the request's headers (the key masked), then a job that succeeds.
        sandbox.script(Step("echo", on="submit"))
        produce(rabbit_url, env["KLING_QUEUE"], [failing])
        wait_terminal(pg_url, 1, 60, [worker])
        produce(rabbit_url, env["KLING_QUEUE"], [good])
        found = wait_terminal(pg_url, 2, 60, [worker])

        engine = create_engine(pg_url)

        def archived_and_sweeps_ran() -> bool:
            # The archive is kept by the poll that ended the job; the beat's sweep runs every second meanwhile.
            with engine.connect() as conn:
                state = conn.execute(
                    sql("select state from deliveries where job_id = :id and channel = 'archive'"),
                    {"id": good["job_id"]},
                ).scalar()
            return state == "done" and time.monotonic() - ready_at > 5

        wait_for(archived_and_sweeps_ran, 60, "the job's archive and a few sweeps", [worker])
        engine.dispose()
    finally:
        worker.stop()
    text = worker.log.read_text()
    lines = json_lines(text)

    assert all({"time", "level", "logger", "message", "event"} <= line.keys() for line in lines)
    events = {line["event"] for line in lines}
    assert {"worker_starting", "worker_ready", "task_received", "worker_shutting_down"} <= events

    ok, bad = found[good["job_id"]], found[failing["job_id"]]
    assert (ok.status, bad.status) == ("succeeded", "failed")
    about = {job: [line for line in lines if job in line["message"]] for job in (ok.id, bad.id)}
    for job, its_lines in about.items():
        assert its_lines and all(line["job_id"] == job and line["event"] for line in its_lines)
    by_event = {line["event"]: line for line in about[ok.id]}
    assert {"job_queued", "job_submitted", "job_succeeded"} <= by_event.keys()
    assert {by_event[e]["modellix_task_id"] for e in ("job_submitted", "job_succeeded")} == {ok.modellix_task_id}
    assert {by_event[e]["tenant"] for e in ("job_queued", "job_submitted")} == {"default"}
    assert [line["event"] for line in about[bad.id]] == ["job_queued", "submit_failed"]
    assert "Bearer ***" in about[bad.id][1]["message"]  # the echoed headers were logged...
    assert sandbox.api_key not in text  # ...without the key
    assert good["request"]["prompt"] not in text  # a task's arguments stay out of the lines

    sweep = [line for line in lines if line.get("task_name") == "kling.sweep" or "kling-sweep" in line["message"]]
    assert [line for line in sweep if line["level"] != "DEBUG"] == []


@pytest.mark.slow
def test_an_unknown_log_format_stops_the_worker_with_one_line(tmp_path):
    env = {**os.environ, "KLING_LOG_FORMAT": "xml", "KLING_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "worker"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == ["kling-worker: KLING_LOG_FORMAT must be one of text, json, not 'xml'"]
    assert done.stdout == ""
