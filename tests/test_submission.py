"""Validate → claim → submit → record and polling, in this process, on real databases and the sandbox.

Celery only carries messages; these tests drive the same functions its tasks call.
"""
from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from models import ApiBudget, JobStatus
from models.job import Job, utcnow
from worker import limits, runtime, submission, tracking


@pytest.fixture
def service(any_db_url, sandbox, configure):
    configure(DATABASE_URL=any_db_url, MODELLIX_BASE_URL=sandbox.url, MODELLIX_API_KEY=sandbox.api_key,
              KLING_MAX_ATTEMPTS=3, KLING_BACKOFF_BASE=0.1, KLING_ACCOUNT_RETRY=30, KLING_POLL_DEADLINE=60)
    return sandbox


def job(job_id: str) -> Job:
    with runtime.session() as s:
        return s.get(Job, job_id)


def handle(**kwargs):
    return submission.handle((), kwargs, "delivery-1")


def test_valid_request_is_submitted_once(service):
    first = handle(request={"prompt": "a cat"}, job_id="j1", metadata={"user": 7})
    again = handle(request={"prompt": "a cat"}, job_id="j1")
    assert first.status is JobStatus.submitted and first.first_poll_in == 2.0
    assert again.status is None  # duplicate: nothing done
    row = job("j1")
    assert row.status == "submitted" and row.modellix_task_id and row.attempts == 1 and row.meta == {"user": 7}
    assert service.stats()["submits"] == 1


def test_job_id_defaults_to_the_delivery_id(service):
    assert handle(request={"prompt": "a cat"}).job_id == "delivery-1"


def test_invalid_request_is_rejected_with_reasons_and_never_sent(service):
    out = handle(request={"prompt": "x", "n": 0, "style_image": "u"}, job_id="bad")
    row = job("bad")
    assert out.status is JobStatus.rejected and row.status == "rejected" and row.error_code == "validation"
    assert '"n"' in row.error_message and "style_image" in row.error_message and row.finished_at
    assert service.stats()["requests"] == 0


@pytest.mark.parametrize("args, kwargs, expect_id, field", [
    ((), {"job_id": "no-request"}, "no-request", "request"),
    ((), {"request": "a string", "job_id": "str-request"}, "str-request", "request"),
    ((), {"request": {"prompt": "x"}, "job_id": "x" * 65}, "delivery-1", "job_id"),
    ((), {"request": {"prompt": "x"}, "job_id": 42}, "delivery-1", "job_id"),
    ((), {"request": {"prompt": "x"}, "priority": 1}, "delivery-1", "priority"),
    (({"prompt": "x"},), {}, "delivery-1", "keyword arguments"),
])
def test_malformed_messages_are_recorded_not_raised(service, args, kwargs, expect_id, field):
    out = submission.handle(args, kwargs, "delivery-1")
    row = job(expect_id)
    assert out.status is JobStatus.rejected and row.status == "rejected" and field in row.error_message


def test_large_invalid_request_is_not_stored_whole(service):
    handle(request={"prompt": "x", "image_list": [{"image": "data:image/png;base64," + "A" * 200_000}]}, job_id="big")
    row = job("big")
    assert row.status == "rejected" and row.request["_omitted"] and row.request["bytes"] > 200_000


def test_transient_errors_back_off_then_fail_with_the_last_error(service):
    service.set_faults(rate_503=1.0)
    delays = []
    for attempt in (1, 2):
        out = handle(request={"prompt": "x"}, job_id="flaky")
        assert out.status is JobStatus.queued and job("flaky").status == "queued"
        delays.append(out.retry_in)
    assert 0.05 <= delays[0] <= 0.1 and 0.1 <= delays[1] <= 0.2  # exponential, jittered
    out = handle(request={"prompt": "x"}, job_id="flaky")
    row = job("flaky")
    assert out.status is JobStatus.failed and row.status == "failed" and row.attempts == 3
    assert row.error_code == "503" and "Service Unavailable" in row.error_message


def test_retry_after_is_honoured(service):
    service.set_faults(rate_429=1.0, retry_after=7)
    out = handle(request={"prompt": "x"}, job_id="limited")
    assert out.retry_in >= 7 and job("limited").error_code == "429"


def test_account_errors_keep_jobs_waiting_and_pause_the_fleet(service):
    service.set_faults(no_balance=True)
    for _ in range(5):  # more tries than KLING_MAX_ATTEMPTS: account trouble never fails a job
        out = handle(request={"prompt": "x"}, job_id="broke")
        assert out.status is JobStatus.queued and out.retry_in >= 15
    row = job("broke")
    assert row.status == "queued" and row.error_code == "402" and row.attempts == 0
    assert service.stats()["requests"] == 1  # the pause held back the other four tries
    with runtime.session() as s:
        budget = limits.status(s)
    assert budget["paused_for"] > 20 and "402" in budget["pause_reason"]

    service.set_faults(no_balance=False)
    with runtime.session() as s:  # as if the pause had run out
        s.execute(update(ApiBudget).values(paused_until=0))
    limits.forget()
    assert handle(request={"prompt": "x"}, job_id="broke").status is JobStatus.submitted


def test_not_found_from_the_api_fails_the_job(service, configure):
    configure(MODELLIX_SUBMIT_PATH="/api/v1/nowhere")
    out = handle(request={"prompt": "x"}, job_id="nowhere")
    row = job("nowhere")
    assert out.status is JobStatus.failed and row.error_code == "404" and "nowhere" in row.error_message


def test_ambiguous_submit_is_not_retried(service, configure):
    configure(MODELLIX_READ_TIMEOUT=0.2)
    service.set_faults(latency=0.5)
    out = handle(request={"prompt": "x"}, job_id="ambiguous")
    row = job("ambiguous")
    assert out.status is JobStatus.failed and row.error_code == "submit_unknown"


def test_poll_until_success_records_urls(service):
    handle(request={"prompt": "x", "n": 2}, job_id="p")
    assert tracking.poll("p", 0) == (1, 2.5)
    assert job("p").status in ("submitted", "processing")
    assert tracking.poll("p", 0) is None  # a stale or duplicate poll message does nothing
    time.sleep(service.task_seconds)
    assert tracking.poll("p", 1) is None
    row = job("p")
    assert row.status == "succeeded" and len(row.result_urls) == 2 and row.polls == 2
    assert row.last_response["status"] == "success" and row.next_poll_at is None


def test_failed_task_and_deadline(service):
    service.set_faults(fail_rate=1.0)
    handle(request={"prompt": "x"}, job_id="f")
    time.sleep(service.task_seconds)
    tracking.poll("f", 0)
    row = job("f")
    assert row.status == "failed" and row.error_code == "task_failed" and "Generation failed" in row.error_message

    service.set_faults(fail_rate=0.0)
    service.task_seconds = 60
    handle(request={"prompt": "y"}, job_id="slow")
    with runtime.session() as s:
        s.execute(update(Job).where(Job.id == "slow").values(submitted_at=utcnow() - timedelta(seconds=61)))
    assert tracking.poll("slow", 0) is None
    row = job("slow")
    assert row.status == "failed" and row.error_code == "timeout"


def test_sweep_redispatches_overdue_polls_and_resolves_interrupted_submits(service, configure):
    configure(KLING_SUBMIT_GRACE=5)
    handle(request={"prompt": "x"}, job_id="lost-poll")
    past = utcnow() - timedelta(seconds=60)
    with runtime.session() as s:
        s.execute(update(Job).where(Job.id == "lost-poll").values(next_poll_at=past))
        s.add(Job(id="stuck", status="submitting", request={"prompt": "x"}, attempts=1,
                  created_at=past, updated_at=past))
    assert tracking.sweep() == [("lost-poll", 0)]
    assert tracking.sweep() == []  # leased: not dispatched twice
    row = job("stuck")
    assert row.status == "failed" and row.error_code == "submit_interrupted"


def test_the_api_key_reaches_no_log_row_or_error(service, configure, any_db_url, caplog):
    caplog.set_level("DEBUG")
    secret = "sk-test-" + "Z9" * 16
    configure(MODELLIX_API_KEY=secret)  # the sandbox expects another key: 401 everywhere
    handle(request={"prompt": "x"}, job_id="k1")
    configure(MODELLIX_API_KEY=service.api_key)
    with runtime.session() as s:  # lift the fleet pause the 401 set
        s.execute(update(ApiBudget).values(paused_until=0))
    assert handle(request={"prompt": "y"}, job_id="k2").status is JobStatus.submitted
    service.set_faults(rate_500=1.0)
    assert tracking.poll("k2", 0) is not None
    with runtime.session() as s:
        dumped = repr([j.to_dict() for j in s.query(Job)])
    assert "401" in dumped  # the rejected key did leave its trace...
    for text in (dumped, caplog.text, repr(runtime.settings())):
        assert secret not in text and service.api_key not in text  # ...but never the key itself
