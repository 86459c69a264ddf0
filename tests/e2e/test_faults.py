"""Faults in the middle of a batch, on real services, as an operator would meet them.

Each test ends with the same audit (worker.dev.jobs.audit): no job lost, no
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
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.support.jobs import wait_for, wait_terminal
from worker.dev.jobs import audit, valid, worker_env
from worker.dev.processes import Worker, produce
from worker.dev.proxy import TcpProxy
from worker.dev.sandbox import Step

# Each test runs a fleet of workers and times its outages: with `make test` (--dist loadgroup) this
# file's tests run one after another on one xdist worker, never beside each other.
pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.xdist_group("faults")]

CLEAN = {"lost": [], "duplicates": 0, "orphaned": 0}


@contextmanager
def two_workers(env: dict[str, str], tmp_path) -> Iterator[list[Worker]]:
    """Two worker processes (the first also runs beat), stopped afterwards."""
    workers = [Worker(env, tmp_path, concurrency=8, beat=(i == 0)) for i in range(2)]
    try:
        for w in workers:
            w.wait_ready()
        yield workers
    finally:
        for w in workers:
            w.stop()


def answered_between(sandbox, start: float, end: float, client: str = "") -> int:
    """Submits (of `client`) answered in that time (the log has arrivals; answers come `latency` later)."""
    latency = sandbox.faults.latency
    return sum(
        1
        for r in sandbox.requests_log()
        if r["kind"] == "submit" and client in r["client"] and start <= r["at"] + latency <= end
    )


def test_a_database_outage_mid_batch_orphans_nothing(rabbit_url, pg_url, sandbox, tmp_path):
    sandbox.task_seconds = 2.0
    sandbox.set_faults(latency=0.5)  # submits are in flight when the database goes away
    proxy = TcpProxy("127.0.0.1", 5432)
    env = worker_env(rabbit_url, pg_url.replace(":5432", f":{proxy.port}"), sandbox, tmp_path)
    try:
        with two_workers(env, tmp_path) as workers:
            messages = [valid(uuid.uuid4().hex[:6], i) for i in range(100)]
            produce(rabbit_url, env["KLING_QUEUE"], messages)
            wait_for(lambda: sandbox.stats()["submits"] >= 20, 60, "submits under way", workers)
            cut_at = time.time()
            proxy.cut()
            time.sleep(10)  # the outage: PostgreSQL unreachable for 10 s
            proxy.restore()
            found = wait_terminal(pg_url, len(messages), 240, workers)
    finally:
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
    try:
        with two_workers(env, tmp_path) as workers:
            messages = [valid(uuid.uuid4().hex[:6], i) for i in range(100)]
            produce(rabbit_url, env["KLING_QUEUE"], messages)  # straight to RabbitMQ: the queue stays full
            wait_for(lambda: sandbox.stats()["submits"] >= 20, 60, "submits under way", workers)
            proxy.cut()
            time.sleep(5)  # RabbitMQ unreachable for 5 s, as in a restart
            proxy.restore()
            found = wait_terminal(pg_url, len(messages), 240, workers)
            # The jobs wait in the table, not on the broker: they may all end before Celery reconnects.
            for w in workers:
                wait_for(lambda w=w: "broker reachable again" in w.output(10**7), 60, "the reconnection", [w])
    finally:
        proxy.close()
    result = audit(sandbox, messages, found)
    assert result | CLEAN == result and result["outcomes"] == [("succeeded", None)], result
    for log in [w.output(10**7) for w in workers]:
        # Celery's and kombu's line per reconnection attempt and lost ack, shaped as one outage.
        assert len(re.findall(r"WARNING/MainProcess\] broker unreachable", log)) == 1, log[-3000:]
        assert "broker reachable again" in log and "Traceback" not in log, log[-6000:]


def client_of(worker: Worker) -> str:
    return f"(pid {worker.proc.pid})"


def test_a_sigtermed_worker_finishes_its_submits_and_hands_its_polls_over_at_once(
    rabbit_url, pg_url, sandbox, tmp_path
):
    sandbox.task_seconds = 15.0
    sandbox.set_faults(latency=0.3)
    env = worker_env(rabbit_url, pg_url, sandbox, tmp_path)
    leaving = Worker(env, tmp_path, concurrency=4).wait_ready()
    staying = Worker(env, tmp_path, concurrency=4, beat=True).wait_ready()
    workers = [leaving, staying]
    try:
        messages = [valid(uuid.uuid4().hex[:6], i) for i in range(40)]
        produce(rabbit_url, env["KLING_QUEUE"], messages)
        mine = client_of(leaving)
        wait_for(
            lambda: sum(1 for r in sandbox.requests_log() if r["kind"] == "submit" and mine in r["client"]) >= 8,
            60,
            "the leaving worker submitting",
            workers,
        )
        stopped_at = time.time()
        leaving.stop()  # SIGTERM: a warm shutdown
        found = wait_terminal(pg_url, len(messages), 240, [staying])
    finally:
        for w in workers:
            w.stop()
    result = audit(sandbox, messages, found)
    assert result | CLEAN == result and result["outcomes"] == [("succeeded", None)], result
    log = sandbox.requests_log()
    followed = {r["task"] for r in log if r["kind"] == "poll" and mine in r["client"] and r["at"] < stopped_at}
    assert followed, "the leaving worker followed no task: the test proves nothing"
    taken_over = {
        task: min(r["at"] for r in log if r.get("task") == task and r["at"] > stopped_at) - stopped_at
        for task in followed
    }
    # Polls were due within KLING_POLL_MAX (1 s) of the stop; without the hand-over the
    # sweep takes a job over only when its poll is OVERDUE_SLACK (10 s) late.
    slowest = max(taken_over.values())
    assert slowest < 5.0, sorted(taken_over.values())
    median = sorted(taken_over.values())[len(taken_over) // 2]
    print(f"hand-over of {len(taken_over)} followed tasks: median {median:.2f}s, slowest {slowest:.2f}s after SIGTERM")
    assert "handed" in leaving.output(10**7) and "scheduled polls over" in leaving.output(10**7)


def test_a_worker_stopped_during_a_database_outage_hands_its_answers_on(rabbit_url, pg_url, sandbox, tmp_path):
    sandbox.task_seconds = 2.0
    sandbox.set_faults(latency=1.0)  # long submits: the answers arrive while the database is away
    proxy = TcpProxy("127.0.0.1", 5432)
    env = worker_env(rabbit_url, pg_url, sandbox, tmp_path)
    cut_off_env = dict(env, DATABASE_URL=pg_url.replace(":5432", f":{proxy.port}"))
    leaving = Worker(cut_off_env, tmp_path, concurrency=4).wait_ready()
    staying = Worker(env, tmp_path, concurrency=4, beat=True).wait_ready()
    workers = [leaving, staying]
    mine = client_of(leaving)
    try:
        messages = [valid(uuid.uuid4().hex[:6], i) for i in range(30)]
        produce(rabbit_url, env["KLING_QUEUE"], messages)

        def answered() -> int:
            return sum(1 for r in sandbox.requests_log() if r["kind"] == "submit" and mine in r["client"])

        wait_for(lambda: answered() >= 4, 60, "the leaving worker's first submits answered", workers)
        time.sleep(0.5)  # its next submits are on their way (each takes 1 s)
        cut_at = time.time()
        proxy.cut()  # only the leaving worker loses its database
        time.sleep(1.5)  # its submits are answered meanwhile: it holds the task ids
        leaving.stop()
        found = wait_terminal(pg_url, len(messages), 240, [staying])
    finally:
        for w in workers:
            w.stop()
        proxy.close()
    assert answered_between(sandbox, cut_at, cut_at + 1.5, client=mine) >= 1, "no answer reached it in the outage"
    assert "fact travels on in a message" in leaving.output(10**7)
    result = audit(sandbox, messages, found)
    assert result | CLEAN == result and result["outcomes"] == [("succeeded", None)], result


@pytest.mark.parametrize("policy", ["unknown", "retry"])
def test_api_faults_follow_the_submit_policy_and_orphan_only_what_the_api_left_unknown(
    policy, rabbit_url, pg_url, sandbox, tmp_path
):
    sandbox.task_seconds = 1.0
    sandbox.set_faults(rate_429=0.05, rate_500=0.05, rate_503=0.05, retry_after=0.2)
    # Three submits whose connection drops after the task was created (the outcome is unknown),
    # and at least one 429 and one 500 to a submit whatever the random shares give.
    sandbox.script(*[Step("drop", on="submit") for _ in range(3)], Step(429, on="submit"), Step(500, on="submit"))
    env = worker_env(rabbit_url, pg_url, sandbox, tmp_path, KLING_SUBMIT_5XX=policy, KLING_MAX_ATTEMPTS=8)
    with two_workers(env, tmp_path) as workers:
        messages = [valid(uuid.uuid4().hex[:6], i) for i in range(80)]
        produce(rabbit_url, env["KLING_QUEUE"], messages)
        found = wait_terminal(pg_url, len(messages), 240, workers)
    submits = [r["status"] for r in sandbox.requests_log() if r["kind"] == "submit"]
    answered_5xx, dropped = sum(s in (500, 503) for s in submits), submits.count(-1)
    assert dropped == 3 and answered_5xx > 0 and submits.count(429) > 0, submits
    result = audit(sandbox, messages, found)
    unknown = [j for j in found.values() if j.error_code == "submit_unknown"]
    assert result["lost"] == [] and result["duplicates"] == 0, result
    # Only the dropped connections created tasks nobody follows: the API said nothing about them.
    assert result["orphaned"] == dropped, result
    assert set(result["outcomes"]) <= {("succeeded", None), ("failed", "submit_unknown")}, result
    if policy == "unknown":  # every 5xx to a submit ends its job: it is never sent again
        assert len(unknown) == answered_5xx + dropped
    else:  # 5xx answers are sent again; only the dropped connections stay unknown
        assert len(unknown) == dropped
