"""Metrics and health of a real `celery worker` process against RabbitMQ, PostgreSQL and the sandbox: its
counters compared with what the sandbox saw and the job table holds."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest
import requests

from models import JobStatus
from tests.support.jobs import wait_for, wait_terminal
from tests.support.metrics import by, get, scrape, served_port, value
from worker.dev.jobs import rows, valid, worker_env
from worker.dev.processes import Worker, produce
from worker.dev.proxy import TcpProxy
from worker.dev.sandbox import Step


@pytest.mark.services
@pytest.mark.slow
def test_a_worker_counts_its_jobs_api_calls_and_tasks_on_its_metrics_port(rabbit_url, pg_url, sandbox, tmp_path):
    # Every answer takes a second; the first submit is answered 429 (the fleet pauses 6 s), the next
    # one's connection drops, and the first poll says the task failed.
    sandbox.set_faults(latency=1.0)
    sandbox.script(Step(429, on="submit", retry_after=6), Step("drop", on="submit"), Step("status:failed", on="poll"))
    env = worker_env(rabbit_url, pg_url, sandbox, tmp_path, KLING_METRICS_PORT=0)
    worker = Worker(env, tmp_path, concurrency=4).wait_ready()  # no beat: the outbox's rows stay where they are
    try:
        port = served_port(worker)
        tag = uuid.uuid4().hex[:6]
        invalid = {
            "request": {"prompt": "x", "n": 10},
            "job_id": f"{tag}-invalid",
            "callback": {"task": "orders.done", "queue": "orders"},
        }
        produce(rabbit_url, env["KLING_QUEUE"], [valid(tag, i) for i in range(3)] + [invalid])
        paused = wait_for(lambda: value(scrape(port), "kling_fleet_paused", reason="rate_limited"), 30, "the pause")
        found = wait_terminal(pg_url, 4, 120, [worker])
        samples = scrape(port)
    finally:
        worker.stop()

    assert paused == 1
    # Each message was delivered once (its job then waited in the line), and no task runs now.
    assert value(samples, "kling_task_runs_total", task="kling.generate") == 4
    assert value(samples, "kling_tasks_in_flight", task="kling.generate") == 0
    outcomes = Counter((j.status, j.error_code or "") for j in found.values())
    assert outcomes == {("succeeded", ""): 1, ("failed", "submit_unknown"): 1, ("failed", "task_failed"): 1} | {
        ("rejected", "validation"): 1
    }
    assert by(samples, "kling_jobs_ended_total", "status", "error_code") == outcomes

    # Every API request the sandbox saw, by endpoint and answer (-1: the dropped connection).
    seen = Counter((r["kind"], str(r["status"]) if r["status"] >= 0 else "error") for r in sandbox.requests_log())
    assert seen[("submit", "429")] == 1 and seen[("submit", "error")] == 1, seen
    assert by(samples, "kling_api_responses_total", "endpoint", "status") == seen
    for endpoint in ("submit", "poll"):
        calls = sum(n for (kind, _), n in seen.items() if kind == endpoint)
        assert value(samples, "kling_api_request_duration_seconds_count", endpoint=endpoint) == calls
        assert value(samples, "kling_api_request_duration_seconds_bucket", endpoint=endpoint, le="+Inf") == calls
        # Each answer took the sandbox's second: none is in the buckets below it.
        assert value(samples, "kling_api_request_duration_seconds_bucket", endpoint=endpoint, le="0.5") == 0
        assert (value(samples, "kling_api_request_duration_seconds_sum", endpoint=endpoint) or 0) >= calls

    assert value(samples, "kling_tasks_in_flight", task="kling.generate") == 0
    assert value(samples, "kling_fleet_paused", reason="rate_limited") == 0
    assert value(samples, "kling_poller_backlog") == 0
    # No beat, so no sweep: the rejected job's callback waits, due. The succeeded job's archive was
    # kept at once by the worker whose poll ended the job (its CPU shows in the deliver phase).
    assert value(samples, "kling_delivery_backlog", channel="archive", state="pending") == 0
    assert value(samples, "kling_delivery_due", channel="callback") == 1
    for phase in ("validate", "claim", "submit", "record", "poll", "deliver"):
        assert value(samples, "kling_cpu_seconds_total", phase=phase) > 0, phase
    assert value(samples, "kling_cpu_seconds_total", phase="sweep") == 0
    assert value(samples, "kling_scrape_errors_total") == 0


@pytest.mark.services
@pytest.mark.slow
def test_health_follows_the_worker_through_outages_and_its_stop(rabbit_url, pg_url, sandbox, tmp_path):
    db_proxy, broker_proxy = TcpProxy("127.0.0.1", 5432), TcpProxy("127.0.0.1", 5672)
    env = worker_env(
        rabbit_url.replace(":5672", f":{broker_proxy.port}"),
        pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{db_proxy.port}"),
        sandbox,
        tmp_path,
        KLING_METRICS_PORT=0,
    )
    worker = Worker(env, tmp_path, concurrency=2).wait_ready()
    try:
        port = served_port(worker)
        assert get(port, "/healthz") == (200, {"status": "ok"})
        assert get(port, "/readyz") == (200, {"status": "ok", "broker": "ok", "database": "ok"})
        assert value(scrape(port), "kling_tasks_in_flight", task="kling.deliver") == 0  # known before it runs

        # The database away: not ready, naming it; still live (it consumes, and waits the outage out).
        db_proxy.cut()
        status, body = wait_for(lambda: (a := get(port, "/readyz"))[0] == 503 and a, 30, "readyz 503", [worker])
        assert body["broker"] == "ok" and body["database"].startswith("cannot connect"), body
        assert get(port, "/healthz")[0] == 200
        db_proxy.restore()
        wait_for(lambda: get(port, "/readyz")[0] == 200, 30, "ready again", [worker])

        # The broker away: the consumer loses its connection, so the process is not consuming.
        broker_proxy.cut()
        status, body = wait_for(lambda: (a := get(port, "/healthz"))[0] == 503 and a, 30, "healthz 503", [worker])
        assert "broker" in body["reason"], body
        # (an answer is kept CACHE seconds: the last one may still say "ok")
        wait_for(
            lambda: get(port, "/readyz")[1]["broker"].startswith("cannot connect"), 30, "broker not ready", [worker]
        )
        broker_proxy.restore()
        wait_for(lambda: get(port, "/healthz")[0] == 200, 60, "consuming again", [worker])
        produce(rabbit_url, env["KLING_QUEUE"], [valid(uuid.uuid4().hex[:6], 0)])
        wait_for(lambda: [j for j in rows(pg_url).values() if j.status == JobStatus.succeeded.value], 60, "a job")
    finally:
        worker.stop()
        db_proxy.close()
        broker_proxy.close()
    # Stopped: nothing answers on the port any more.
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
