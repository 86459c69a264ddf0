"""Metrics and health: what a worker's /metrics, /healthz and /readyz say, scraped over HTTP.

The last two tests run a real `celery worker` process against RabbitMQ, PostgreSQL and the
sandbox, and compare its counters with what the sandbox saw and the job table holds. The
others drive the pieces in this process against the same real servers; an outage is a TCP
proxy of the test's own (tests/proxy.py), cut and restored.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
import requests
from celery import Celery
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from models import JobStatus, lifecycle, outbox
from models.job import Job, utcnow
from tests.proxy import TcpProxy
from tests.support import job, rows, submitted, valid, wait_for, wait_terminal, worker_env
from worker import resources
from worker.config import ConfigError, Settings
from worker.dev.processes import Worker, produce
from worker.dev.sandbox import Step
from worker.ops import health, metrics
from worker.polling import tracking

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    answer = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert answer.status_code == 200, answer.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def family(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def by(samples: Samples, name: str, *keys: str) -> dict[tuple[str, ...], float]:
    """A family's values keyed by the values of the labels `keys`."""
    return {tuple(dict(labels)[k] for k in keys): v for labels, v in family(samples, name).items()}


def get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    answer = requests.get(f"http://127.0.0.1:{port}{path}", timeout=10)
    return answer.status_code, answer.json()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- settings and labels ---------------------------------------------------------------


@pytest.mark.parametrize("raw, port", [("", None), ("9808", 9808), ("0", 0), ("65535", 65535)])
def test_the_metrics_port_is_optional_and_0_means_any_free_port(monkeypatch, raw, port):
    monkeypatch.setenv("KLING_METRICS_PORT", raw)
    assert Settings().metrics_port == port


@pytest.mark.parametrize("raw", ["65536", "-1", "abc", "9808.5"])
def test_a_metrics_port_that_is_not_a_port_is_refused_by_name(monkeypatch, raw):
    monkeypatch.setenv("KLING_METRICS_PORT", raw)
    with pytest.raises(ConfigError, match="KLING_METRICS_PORT"):
        Settings()


def test_labels_come_from_small_fixed_sets():
    assert [metrics.error_code_label(c) for c in (None, "", "validation", "submit_unknown", "429", "503")] == [
        "",
        "",
        "validation",
        "submit_unknown",
        "429",
        "503",
    ]
    # A number from an answer's body, or anything else, cannot open series without end.
    assert {metrics.error_code_label(c) for c in ("10001", "99", "Task Failed", "job-123", "a" * 40)} == {"other"}
    assert [metrics.pause_reason_label(r) for r in ("429 from Modellix", "401 bad key", "402 no money", "", "x")] == [
        "rate_limited",
        "key_refused",
        "balance",
        "other",
        "other",
    ]


def test_without_a_port_no_server_is_started(configure):
    configure(KLING_METRICS_PORT="")
    assert health.start(consumer=None) is None


# -- jobs ended where no API answer ends them ---------------------------------------------


def test_jobs_the_deadline_and_the_sweep_end_are_counted_once_each(service, configure):
    def ended(code: str) -> float:
        return sample("kling_jobs_ended_total", status="failed", error_code=code)

    before = ended("timeout"), ended("submit_interrupted")
    service.task_seconds = 60
    submitted("slow")
    with resources.get().transaction() as s:
        s.execute(update(Job).where(Job.id == "slow").values(submitted_at=utcnow() - timedelta(seconds=61)))
    assert tracking.check("slow", 0) is None and job("slow").error_code == "timeout"
    configure(KLING_SUBMIT_GRACE=50)
    past = utcnow() - timedelta(seconds=60)
    with resources.get().transaction() as s:
        s.add(Job(id="stuck", status="submitting", request={}, attempts=1, created_at=past, updated_at=past))
    tracking.sweep()
    tracking.sweep()  # nothing left to end: nothing counted again
    assert job("stuck").error_code == "submit_interrupted"
    assert (ended("timeout") - before[0], ended("submit_interrupted") - before[1]) == (1, 1)


# -- the API calls, counted by the client's metered session ------------------------------


def test_api_calls_are_timed_and_counted_by_endpoint_and_answer(sandbox, configure):
    configure(MODELLIX_BASE_URL=sandbox.url, MODELLIX_API_KEY=sandbox.api_key)
    client = resources.get().client
    before = {
        key: sample("kling_api_responses_total", endpoint=key[0], status=key[1])
        for key in [("submit", "200"), ("submit", "error"), ("poll", "200"), ("poll", "429"), ("other", "200")]
    }
    timed = {e: sample("kling_api_request_duration_seconds_count", endpoint=e) for e in metrics.ENDPOINTS}

    task = client.submit({"prompt": "a cat"})
    client.get_task(task.task_id)
    sandbox.script(Step(429, on="poll"), Step("drop", on="submit"))
    with pytest.raises(Exception, match="429|Too Many"):
        client.get_task(task.task_id)
    with pytest.raises(Exception, match="connection"):
        client.submit({"prompt": "a dog"})  # the answer is lost: no status, "error"
    assert client.validate_key() is True

    after = {key: sample("kling_api_responses_total", endpoint=key[0], status=key[1]) for key in before}
    assert {k: after[k] - before[k] for k in before} == {
        ("submit", "200"): 1,
        ("submit", "error"): 1,
        ("poll", "200"): 1,
        ("poll", "429"): 1,
        ("other", "200"): 1,
    }
    counted = {e: sample("kling_api_request_duration_seconds_count", endpoint=e) - timed[e] for e in metrics.ENDPOINTS}
    assert counted == {"submit": 2, "poll": 2, "other": 1}


# -- read at scrape time -----------------------------------------------------------------


def ended_jobs_with_deliveries() -> None:
    """One job succeeded with a webhook (an archive due, its event waiting), two rejected with a
    callback (one due, one retried in an hour)."""
    now = utcnow()
    callback = {"task": "orders.done", "queue": "orders"}
    with resources.get().transaction() as s:
        lifecycle.claim_for_submit(s, "ok", {}, None, now, webhook="https://hooks.example/x")
        lifecycle.mark_submitted(s, "ok", now, task_id="t-ok", answer={}, next_poll_at=now)
        lifecycle.succeed(s, "ok", now, result_urls=["https://img.example/0.png"], answer={})
        lifecycle.reject(s, "bad-1", {}, None, now - timedelta(seconds=30), "invalid", callback=callback)
        lifecycle.reject(s, "bad-2", {}, None, now, "invalid", callback=callback)
        later = [d.id for d in outbox.for_job(s, "bad-2")]
        outbox.retry_at(s, later[0], now, now + timedelta(hours=1), "refused")


def test_the_snapshot_reads_the_outbox_backlog_the_pause_and_the_poll_timer(any_db_url, configure):
    configure(DATABASE_URL=any_db_url)
    ended_jobs_with_deliveries()
    engine = health.probe_engine(any_db_url)
    snapshot = metrics.Snapshot(
        pause=lambda: (time.time() + 30, "429 from Modellix"),
        poller_backlog=lambda: 7,
        read_backlog=lambda: health.read_backlog(engine),
    )
    server = health.HealthServer(0, lambda: None, dict, snapshot, address="127.0.0.1").start()
    try:
        samples = scrape(server.port)
    finally:
        server.stop()

    assert by(samples, "kling_delivery_backlog", "channel", "state") == {
        ("archive", "waiting"): 0,
        ("archive", "pending"): 1,
        ("webhook", "waiting"): 1,
        ("webhook", "pending"): 0,
        ("callback", "waiting"): 0,
        ("callback", "pending"): 2,
    }
    assert by(samples, "kling_delivery_due", "channel") == {("archive",): 1, ("webhook",): 0, ("callback",): 1}
    oldest = by(samples, "kling_delivery_oldest_due_seconds", "channel")
    assert 25 <= oldest[("callback",)] < 120 and oldest[("webhook",)] == 0, oldest
    assert value(samples, "kling_scrape_errors_total") == 0
    assert by(samples, "kling_fleet_paused", "reason") == {
        ("rate_limited",): 1,
        ("key_refused",): 0,
        ("balance",): 0,
        ("other",): 0,
    }
    assert 25 < (value(samples, "kling_fleet_pause_seconds_left") or 0) <= 30
    assert value(samples, "kling_poller_backlog") == 7
    # The library's own process metrics come along.
    assert value(samples, "process_resident_memory_bytes")


@pytest.mark.services
def test_a_database_outage_leaves_the_backlog_out_of_metrics_and_makes_readyz_name_it(pg_url, rabbit_url):
    db_proxy, broker_proxy = TcpProxy("127.0.0.1", 5432), TcpProxy("127.0.0.1", 5672)
    database = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{db_proxy.port}")
    app = Celery(broker=rabbit_url.replace(":5672", f":{broker_proxy.port}"))
    engine = health.probe_engine(database)
    backlog = health.Cached(lambda: health.read_backlog(engine), ttl=0)
    snapshot = metrics.Snapshot(lambda: (0.0, ""), lambda: 0, backlog.get)
    ready = {
        "broker": health.Cached(lambda: health.broker_problem(app), ttl=0),
        "database": health.Cached(lambda: health.database_problem(engine), ttl=0),
    }
    server = health.HealthServer(
        0, lambda: None, lambda: {k: c.get() for k, c in ready.items()}, snapshot, address="127.0.0.1"
    ).start()
    try:
        assert get(server.port, "/readyz") == (200, {"status": "ok", "broker": "ok", "database": "ok"})
        assert value(scrape(server.port), "kling_delivery_backlog", channel="archive", state="pending") == 0

        db_proxy.cut()
        status, body = get(server.port, "/readyz")
        assert (status, body["status"], body["broker"]) == (503, "unavailable", "ok"), body
        assert body["database"].startswith("cannot connect: OperationalError"), body
        samples = scrape(server.port)  # still 200, without the series it could not read
        assert value(samples, "kling_scrape_errors_total") == 1
        assert not family(samples, "kling_delivery_backlog") and value(samples, "kling_poller_backlog") == 0
        db_proxy.restore()

        broker_proxy.cut()
        status, body = get(server.port, "/readyz")
        assert (status, body["database"]) == (503, "ok") and body["broker"].startswith("cannot connect"), body
        broker_proxy.restore()
        assert get(server.port, "/readyz")[0] == 200
        assert get(server.port, "/healthz") == (200, {"status": "ok"})
        missing = requests.get(f"http://127.0.0.1:{server.port}/nothing", timeout=5)
        assert missing.status_code == 404 and "/metrics" in missing.text
    finally:
        server.stop()
        db_proxy.close()
        broker_proxy.close()


def test_a_cached_answer_is_read_once_per_period_however_many_ask():
    reads: list[float] = []

    def read() -> int:
        reads.append(time.monotonic())
        time.sleep(0.2)  # a slow probe: callers arriving meanwhile wait for it instead of probing too
        if len(reads) == 2:
            raise ConnectionError("refused")
        return len(reads)

    cached = health.Cached(read, ttl=60)
    answers: list[int] = []
    threads = [threading.Thread(target=lambda: answers.append(cached.get())) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [1] * 20 and len(reads) == 1
    cached.ttl = 0  # an expired answer is read again, and a failure is kept like an answer
    with pytest.raises(ConnectionError):
        cached.get()
    cached.ttl = 60
    with pytest.raises(ConnectionError):
        cached.get()
    assert len(reads) == 2


# -- a real worker process ---------------------------------------------------------------------

SERVING = re.compile(r"metrics and health on http://0\.0\.0\.0:(\d+)")


def served_port(worker: Worker) -> int:
    found = wait_for(lambda: SERVING.search(worker.output(10**7)), 30, "the metrics server started", [worker])
    return int(found[1])


@pytest.mark.services
@pytest.mark.slow
def test_a_worker_counts_its_jobs_api_calls_and_tasks_on_its_metrics_port(rabbit_url, pg_url, sandbox, tmp_path):
    # Every answer takes a second, so a running task can be seen; the first submit is answered 429
    # (the fleet pauses 6 s), the next one's connection drops, and the first poll says the task failed.
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
        running = wait_for(lambda: value(scrape(port), "kling_tasks_in_flight", task="kling.generate"), 30, "a task")
        paused = wait_for(lambda: value(scrape(port), "kling_fleet_paused", reason="rate_limited"), 30, "the pause")
        found = wait_terminal(pg_url, 4, 120, [worker])
        samples = scrape(port)
    finally:
        worker.stop()

    assert running >= 1 and paused == 1
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
