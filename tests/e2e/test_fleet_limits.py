"""Fleet-wide limits with several real worker processes on RabbitMQ + PostgreSQL."""

from __future__ import annotations

import time
import uuid
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text

from tests.support.jobs import wait_for, wait_terminal
from tests.support.metrics import scrape, served_port, value
from worker.dev.jobs import valid, worker_env
from worker.dev.processes import Worker, produce
from worker.dev.sandbox import Step

# Each test runs a fleet of workers: with `make test` (--dist loadgroup) this file's tests run one after
# another on one xdist worker, never beside each other. Those marked `timing` count requests per second
# or a window of silence, and `make test` runs them alone after the parallel run: beside three other
# test processes a loaded machine wakes threads late (once 11 requests in a second at MAX_RPS=10).
pytestmark = [pytest.mark.services, pytest.mark.xdist_group("fleet-limits")]


@contextmanager
def fleet(rabbit_url, pg_url, sandbox, tmp_path, jobs: int, size: int = 4, concurrency: int = 16, **settings: str):
    """`size` workers (the first with beat) fed `jobs` valid messages; yields the workers, stops them after."""
    env = worker_env(rabbit_url, pg_url, sandbox, tmp_path, **settings)
    workers = [Worker(env, tmp_path, concurrency=concurrency, beat=(i == 0)) for i in range(size)]
    try:
        for w in workers:
            w.wait_ready()
        tag = uuid.uuid4().hex[:6]
        produce(rabbit_url, env["KLING_QUEUE"], [valid(tag, i) for i in range(jobs)])
        yield workers
    finally:
        for w in workers:
            w.stop()


def run_fleet(rabbit_url, pg_url, sandbox, tmp_path, jobs: int, **limits: str):
    with fleet(rabbit_url, pg_url, sandbox, tmp_path, jobs, **limits) as workers:
        found = wait_terminal(pg_url, jobs, 180, workers)
    assert {j.status for j in found.values()} == {"succeeded"}
    stats = sandbox.stats()
    assert stats["submits"] == jobs and stats["duplicate_prompts"] == 0
    return stats


@pytest.mark.timing
def test_max_rps_holds_across_four_workers(rabbit_url, pg_url, sandbox, tmp_path):
    stats = run_fleet(rabbit_url, pg_url, sandbox, tmp_path, 60, MODELLIX_MAX_RPS=20)
    # 60 submits plus their polls: several seconds at the limit, so the window is really tested.
    assert stats["requests"] >= 100
    assert stats["max_requests_per_second"] <= 20, stats


def test_max_in_flight_holds_across_four_workers(rabbit_url, pg_url, sandbox, tmp_path):
    sandbox.task_seconds = 1.0
    stats = run_fleet(rabbit_url, pg_url, sandbox, tmp_path, 50, MODELLIX_MAX_IN_FLIGHT=10)
    assert stats["max_unfinished"] == 10, stats  # reached, never exceeded


@pytest.mark.timing
def test_a_429_pauses_every_worker_for_its_retry_after(rabbit_url, pg_url, sandbox, tmp_path):
    """One worker gets the 429; the others must fall silent too (they learn of it from the database)."""
    sandbox.task_seconds = 10.0  # polls keep every worker busy for the whole test
    jobs = 30
    with fleet(rabbit_url, pg_url, sandbox, tmp_path, jobs, size=3, concurrency=8, KLING_POLL_MAX="0.5") as workers:
        wait_for(lambda: sandbox.stats()["submits"] == jobs, 60, "every job submitted", workers)
        time.sleep(1)  # polling in full swing
        sandbox.script(Step(429, on="poll", retry_after=4))
        found = wait_terminal(pg_url, jobs, 120, workers)
    assert {j.status for j in found.values()} == {"succeeded"}
    log = sandbox.requests_log()
    hit = next(r for r in log if r["status"] == 429)
    t0 = hit["at"]
    before = {r["client"] for r in log if t0 - 1.5 <= r["at"] < t0}
    assert len(before) == 3  # all three workers were calling the API just before
    # Workers re-read the pause at least once a second; after that, silence until it ends.
    during = [r for r in log if t0 + 1.8 <= r["at"] <= t0 + 3.8]
    assert during == [], f"{len(during)} requests from {len({r['client'] for r in during})} workers during the pause"
    after = {r["client"] for r in log if r["at"] > t0 + 4}
    assert after  # and the fleet resumed


def test_a_fleet_waiting_for_credit_sends_no_submit_and_resumes_soon_after_a_top_up(
    rabbit_url, pg_url, sandbox, tmp_path
):
    """Without credit, the fleet pauses on the first 402 and learns of the top-up from the balance
    (asked by the sweep), not from paid submits; the jobs then end long before KLING_ACCOUNT_RETRY."""
    sandbox.balance = 0
    jobs = 10
    with fleet(rabbit_url, pg_url, sandbox, tmp_path, jobs, size=2, concurrency=4, KLING_ACCOUNT_RETRY="120") as w:
        wait_for(lambda: any(r["status"] == 402 for r in sandbox.requests_log()), 30, "a 402", w)
        time.sleep(8)  # the sweep asks for the balance meanwhile; held jobs come back and find the pause
        waiting = sandbox.requests_log()
        topped_up = time.time()
        sandbox.balance = 50
        found = wait_terminal(pg_url, jobs, 90, w)
    assert {j.status for j in found.values()} == {"succeeded"}
    submits_402 = [r for r in waiting if r["status"] == 402]
    # Only the submits already past the pause check when the first 402 came (one per busy thread at most).
    assert 1 <= len(submits_402) <= 8
    assert any(r["kind"] == "other" and r["status"] == 200 for r in waiting)  # the sweep asked for the balance
    ended = max(j.finished_at.timestamp() for j in found.values())
    print(f"\n{len(submits_402)} submits answered 402; every job ended {ended - topped_up:.1f}s after the top-up")
    assert ended - topped_up < 45, f"the fleet took {ended - topped_up:.0f}s to resume (KLING_ACCOUNT_RETRY is 120)"


@pytest.mark.timing
def test_a_backlog_under_max_rps_is_delivered_once_per_job(rabbit_url, pg_url, sandbox, tmp_path):
    """60 jobs where MAX_SLEEP (5 s) of slots at 10 rps holds only 41 requests: each message is
    acknowledged once its job is in the line, where the jobs wait for their turns."""
    jobs = 60
    env = worker_env(rabbit_url, pg_url, sandbox, tmp_path, MODELLIX_MAX_RPS=10, KLING_METRICS_PORT=0)
    workers = [Worker(env, tmp_path, concurrency=32) for _ in range(2)]
    try:
        ports = [served_port(w.wait_ready()) for w in workers]
        produce(rabbit_url, env["KLING_QUEUE"], [valid(uuid.uuid4().hex[:6], i) for i in range(jobs)])
        found = wait_terminal(pg_url, jobs, 120, workers)
        runs = sum(value(scrape(port), "kling_task_runs_total", task="kling.generate") or 0 for port in ports)
    finally:
        for w in workers:
            w.stop()
    assert {j.status for j in found.values()} == {"succeeded"}
    stats = sandbox.stats()
    assert stats["submits"] == jobs and stats["duplicate_prompts"] == 0
    assert stats["max_requests_per_second"] <= 10, stats
    print(f"\n{runs / jobs:.2f} deliveries of kling.generate per job")
    assert runs == jobs


def test_a_warm_shutdown_ends_the_wait_for_budget_at_once_and_the_jobs_wait_for_the_next_worker(
    rabbit_url, pg_url, sandbox, tmp_path
):
    env = worker_env(rabbit_url, pg_url, sandbox, tmp_path, MODELLIX_MAX_RPS=1, KLING_METRICS_PORT=0)
    budget_row = create_engine(pg_url)
    with budget_row.begin() as conn:  # the fleet has booked the next two minutes of requests
        conn.execute(text("update api_budget set next_slot = :t"), {"t": time.time() + 120})
    first = Worker(env, tmp_path, concurrency=4)
    try:
        port = served_port(first.wait_ready())
        tag = uuid.uuid4().hex[:6]
        produce(rabbit_url, env["KLING_QUEUE"], [valid(tag, i) for i in range(3)])
        queued = lambda: value(scrape(port), "kling_tenant_jobs", tenant="default", state="queued") == 3  # noqa: E731
        wait_for(queued, 30, "three jobs waiting in the line", [first])
        time.sleep(1)
        stopping = time.monotonic()
        first.stop()
        stopped = time.monotonic() - stopping
    finally:
        first.stop()
    assert stopped < 8, f"the warm shutdown took {stopped:.1f}s"
    with budget_row.begin() as conn:
        conn.execute(text("update api_budget set next_slot = 0"))
    budget_row.dispose()
    second = Worker(env, tmp_path, concurrency=4)
    try:
        found = wait_terminal(pg_url, 3, 60, [second.wait_ready()])
    finally:
        second.stop()
    assert {j.status for j in found.values()} == {"succeeded"}  # no job lost with the first worker
    assert sandbox.stats()["submits"] == 3
