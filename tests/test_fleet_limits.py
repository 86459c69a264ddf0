"""Fleet-wide limits with several real worker processes on RabbitMQ + PostgreSQL."""
from __future__ import annotations

import uuid

import pytest

from tests.processes import Worker, produce
from tests.test_integration import valid, wait_terminal, worker_env

pytestmark = pytest.mark.services


def run_fleet(rabbit_url, pg_url, sandbox, tmp_path, jobs: int, **limits: str):
    env = worker_env(rabbit_url, pg_url, sandbox, tmp_path, **limits)
    workers = [Worker(env, tmp_path, concurrency=16, beat=(i == 0)) for i in range(4)]
    try:
        for w in workers:
            w.wait_ready()
        tag = uuid.uuid4().hex[:6]
        produce(rabbit_url, env["KLING_QUEUE"], [valid(tag, i) for i in range(jobs)])
        found = wait_terminal(pg_url, jobs, 180, workers)
    finally:
        for w in workers:
            w.stop()
    assert {j.status for j in found.values()} == {"succeeded"}
    stats = sandbox.stats()
    assert stats["submits"] == jobs and stats["duplicate_prompts"] == 0
    return stats


def test_max_rps_holds_across_four_workers(rabbit_url, pg_url, sandbox, tmp_path):
    stats = run_fleet(rabbit_url, pg_url, sandbox, tmp_path, 60, MODELLIX_MAX_RPS=20)
    # 60 submits plus their polls: several seconds at the limit, so the window is really tested.
    assert stats["requests"] >= 100
    assert stats["max_requests_per_second"] <= 22, stats


def test_max_in_flight_holds_across_four_workers(rabbit_url, pg_url, sandbox, tmp_path):
    sandbox.task_seconds = 1.0
    stats = run_fleet(rabbit_url, pg_url, sandbox, tmp_path, 50, MODELLIX_MAX_IN_FLIGHT=10)
    assert stats["max_unfinished"] == 10, stats  # reached, never exceeded


def test_429_slows_the_whole_fleet(rabbit_url, pg_url, sandbox, tmp_path):
    sandbox.set_faults(rate_429=0.2, retry_after=0.5)
    stats = run_fleet(rabbit_url, pg_url, sandbox, tmp_path, 40)
    assert stats["status_counts"]["429"] >= 1
    # Without the fleet pause every worker keeps firing into the limit; with it,
    # the 429s stay a minority of the answers despite the injected 20 % rate.
    assert stats["status_counts"]["429"] <= 0.3 * stats["requests"]
