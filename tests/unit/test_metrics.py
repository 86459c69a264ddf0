"""Metrics and health: what a worker's /metrics, /healthz and /readyz say, in this process (the
sandbox, SQLite). A database outage: tests/services/test_metrics.py; a real `celery worker`
process: tests/e2e/test_metrics.py.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from models import JobStatus, lifecycle, outbox
from models.job import Job, utcnow
from tests.support.jobs import job, submitted
from tests.support.metrics import by, sample, scrape, value
from worker import resources
from worker.config import ConfigError, Settings
from worker.dev.sandbox import Step
from worker.ops import health, metrics
from worker.polling import tracking

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
    assert health.start(resources.get(), consumer=None) is None


# -- jobs ended where no API answer ends them ---------------------------------------------


def test_jobs_the_deadline_and_the_sweep_end_are_counted_once_each(service, configure):
    def ended(code: str) -> float:
        return sample("kling_jobs_ended_total", status="failed", error_code=code)

    before = ended("timeout"), ended("submit_interrupted")
    service.task_seconds = 60
    submitted("slow")
    with resources.get().transaction() as s:
        s.execute(update(Job).where(Job.id == "slow").values(submitted_at=utcnow() - timedelta(seconds=61)))
    assert tracking.check(resources.get(), "slow", 0) == tracking.Ended("slow", notify=False)
    assert job("slow").error_code == "timeout"
    configure(KLING_SUBMIT_GRACE=50)
    past = utcnow() - timedelta(seconds=60)
    with resources.get().transaction() as s:
        s.add(Job(id="stuck", status="submitting", request={}, attempts=1, created_at=past, updated_at=past))
    tracking.sweep(resources.get())
    tracking.sweep(resources.get())  # nothing left to end: nothing counted again
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
        lifecycle.create(s, "ok", JobStatus.queued, {}, None, now, webhook="https://hooks.example/x")
        lifecycle.take(s, "ok", now)
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


def test_the_snapshot_shows_each_tenants_queued_and_in_flight_jobs():
    from models.tenants import InLine

    snapshot = metrics.Snapshot(
        pause=lambda: (0.0, ""),
        poller_backlog=lambda: 0,
        read_backlog=list,
        read_tenants=lambda: [InLine("batch", 7, 0), InLine("web", 3, 1)],
    )
    found = {
        (s.labels["tenant"], s.labels["state"]): s.value
        for family in snapshot.collect()
        if family.name == "kling_tenant_jobs"
        for s in family.samples
    }
    assert found == {("batch", "queued"): 7, ("batch", "in_flight"): 0, ("web", "queued"): 3, ("web", "in_flight"): 1}
