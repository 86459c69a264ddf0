"""The documented defaults that shape a worker: poll schedule, pools, delivery settings."""

from __future__ import annotations

import pytest

from worker import api_errors, runtime, schedule
from worker.config import Settings


def test_poll_schedule_is_2s_then_times_1_25_capped_at_30s():
    cfg = Settings()
    gaps = [schedule.gap(i, cfg) for i in range(20)]
    due = [round(sum(gaps[: i + 1]), 1) for i in range(5)]
    assert due == [2.0, 4.5, 7.6, 11.5, 16.4]  # the README's figures
    assert max(gaps) == 30.0 and gaps[-1] == 30.0


def test_retry_backoff_doubles_with_jitter_and_honours_retry_after():
    cfg = Settings(backoff_base=1.0, backoff_max=60.0)
    for attempt, ceiling in ((1, 1), (2, 2), (3, 4), (8, 60), (20, 60)):
        delays = [api_errors.retry_delay(attempt, cfg) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert api_errors.retry_delay(1, cfg, retry_after=9) == 9


def test_the_submit_grace_must_outlast_a_live_submit():
    # 5 s of budget wait + 5 s connect + 30 s read: a shorter grace would fail live submits as interrupted.
    with pytest.raises(ValueError, match="KLING_SUBMIT_GRACE .* 40s"):
        Settings(submit_grace=40)
    assert Settings(submit_grace=41).submit_grace == 41
    assert Settings(submit_grace=10, connect_timeout=1, read_timeout=3).submit_grace == 10


def test_at_least_one_attempt():
    with pytest.raises(ValueError, match="KLING_MAX_ATTEMPTS"):
        Settings(max_attempts=0)
    assert Settings(max_attempts=1).max_attempts == 1


@pytest.mark.parametrize("concurrency, db_pool, expected", [("128", None, 16), ("16", None, 4), ("32", "7", 7)])
def test_database_pool_is_an_eighth_of_the_threads_at_least_four(configure, concurrency, db_pool, expected):
    configure(KLING_CONCURRENCY=concurrency, **({"KLING_DB_POOL": db_pool} if db_pool else {}))
    assert runtime.get().db_pool_size == expected


def test_http_pool_holds_a_connection_per_thread(configure):
    configure(KLING_CONCURRENCY="48", MODELLIX_BASE_URL="http://127.0.0.1:9")
    adapter = runtime.get().client.session.get_adapter("http://127.0.0.1:9")
    assert adapter._pool_maxsize >= 48


def test_delivery_settings_lose_no_message(configure, tmp_path):
    configure(KLING_HOME=str(tmp_path))
    from worker.app import app

    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost  # a killed worker's message is requeued
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_pool == "threads"
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"


def test_kling_home_holds_the_embedded_database(monkeypatch, tmp_path):
    from worker import config

    monkeypatch.setenv("KLING_HOME", str(tmp_path / "h"))
    assert config.home() == tmp_path / "h"
    assert Settings().database_url == f"sqlite:///{tmp_path / 'h' / 'jobs.sqlite'}"
    monkeypatch.delenv("KLING_HOME")
    monkeypatch.chdir(tmp_path)
    assert config.home() == tmp_path / ".kling"


def test_celery_finds_the_app_as_worker_celery(configure, tmp_path):
    configure(KLING_HOME=str(tmp_path))
    import worker
    from worker.app import app

    assert worker.celery is app  # what `celery -A worker` looks up
    with pytest.raises(AttributeError):
        _ = worker.nothing_here


def test_the_job_row_as_json_has_the_documented_columns():
    from models.job import Job

    documented = {
        "id",
        "status",
        "modellix_task_id",
        "request",
        "metadata",
        "result_urls",
        "error_code",
        "error_message",
        "attempts",
        "polls",
        "next_poll_at",
        "last_response",
        "created_at",
        "updated_at",
        "submitted_at",
        "finished_at",
        "webhook",
        "callback",
        "files",
        "retry_of",
    }
    assert set(Job(id="j", status="queued", request={}).to_dict()) == documented
