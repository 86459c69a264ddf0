"""Faults in the middle of a batch, on real services, as an operator would meet them.

Each test ends with the same audit (tests.support.audit): no job lost, no
Modellix task submitted twice for one job, and no task orphaned (created by
the API, so billed, without a job that succeeded with it), except where the
fault itself makes an orphan possible (a SIGKILL during a submit). The shared
PostgreSQL and RabbitMQ are never stopped: a TCP proxy of the test's own cuts
the workers off from them.
"""

from __future__ import annotations

import re
import time
import uuid

import pytest

from tests.proxy import TcpProxy
from tests.support import audit, valid, wait_for, wait_terminal, worker_env
from worker.dev.processes import Worker, produce

pytestmark = [pytest.mark.services, pytest.mark.slow]

CLEAN = {"lost": [], "duplicates": 0, "orphaned": 0}


def answered_between(sandbox, start: float, end: float) -> int:
    """Submits answered in that time (the log has arrivals; each answer comes `latency` later)."""
    latency = sandbox.faults.latency
    return sum(1 for r in sandbox.requests_log() if r["kind"] == "submit" and start <= r["at"] + latency <= end)


def test_a_database_outage_mid_batch_orphans_nothing(rabbit_url, pg_url, sandbox, tmp_path):
    sandbox.task_seconds = 2.0
    sandbox.set_faults(latency=0.5)  # submits are in flight when the database goes away
    proxy = TcpProxy("127.0.0.1", 5432)
    env = worker_env(rabbit_url, pg_url.replace(":5432", f":{proxy.port}"), sandbox, tmp_path)
    workers = [Worker(env, tmp_path, concurrency=8, beat=(i == 0)) for i in range(2)]
    try:
        for w in workers:
            w.wait_ready()
        messages = [valid(uuid.uuid4().hex[:6], i) for i in range(100)]
        produce(rabbit_url, env["KLING_QUEUE"], messages)
        wait_for(lambda: sandbox.stats()["submits"] >= 20, 60, "submits under way", workers)
        cut_at = time.time()
        proxy.cut()
        time.sleep(10)  # the outage: PostgreSQL unreachable for 10 s
        proxy.restore()
        found = wait_terminal(pg_url, len(messages), 240, workers)
    finally:
        for w in workers:
            w.stop()
        proxy.close()
    answered_in_outage = answered_between(sandbox, cut_at, cut_at + 10)
    assert answered_in_outage >= 1, "no submit was answered during the outage: the test proves nothing"
    result = audit(sandbox, messages, found)
    assert result | CLEAN == result and result["outcomes"] == [("succeeded", None)], result
    logs = [w.output(10**7) for w in workers]
    for log in logs:
        # One line when it starts and one when it ends, per process; no traceback per task.
        assert len(re.findall(r"WARNING.*database unreachable", log)) == 1, log[-3000:]
        assert len(re.findall(r"database reachable again", log)) >= 1, log[-3000:]
        assert "Traceback" not in log, log[-6000:]


def test_a_broker_outage_mid_batch_orphans_nothing(rabbit_url, pg_url, sandbox, tmp_path):
    sandbox.task_seconds = 2.0
    sandbox.set_faults(latency=0.3)
    proxy = TcpProxy("127.0.0.1", 5672)
    env = worker_env(rabbit_url.replace(":5672", f":{proxy.port}"), pg_url, sandbox, tmp_path)
    workers = [Worker(env, tmp_path, concurrency=8, beat=(i == 0)) for i in range(2)]
    try:
        for w in workers:
            w.wait_ready()
        messages = [valid(uuid.uuid4().hex[:6], i) for i in range(100)]
        produce(rabbit_url, env["KLING_QUEUE"], messages)  # straight to RabbitMQ: the queue stays full
        wait_for(lambda: sandbox.stats()["submits"] >= 20, 60, "submits under way", workers)
        proxy.cut()
        time.sleep(5)  # RabbitMQ unreachable for 5 s, as in a restart
        proxy.restore()
        found = wait_terminal(pg_url, len(messages), 240, workers)
    finally:
        for w in workers:
            w.stop()
        proxy.close()
    result = audit(sandbox, messages, found)
    assert result | CLEAN == result and result["outcomes"] == [("succeeded", None)], result
