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
from worker import cli, limits, runtime, submission, tracking
from worker.sandbox import Step


@pytest.fixture
def service(any_db_url, sandbox, configure):
    configure(
        DATABASE_URL=any_db_url,
        MODELLIX_BASE_URL=sandbox.url,
        MODELLIX_API_KEY=sandbox.api_key,
        KLING_MAX_ATTEMPTS=3,
        KLING_BACKOFF_BASE=0.1,
        KLING_ACCOUNT_RETRY=30,
        KLING_POLL_DEADLINE=60,
    )
    return sandbox


def job(job_id: str) -> Job:
    with runtime.session() as s:
        return s.get(Job, job_id)


def handle(**kwargs):
    return submission.handle((), kwargs, "delivery-1")


def submitted(job_id: str) -> Job:
    out = handle(request={"prompt": f"picture {job_id}"}, job_id=job_id)
    assert out.status is JobStatus.submitted
    return job(job_id)


def set_budget(**values) -> None:
    """Write the shared budget row as another worker (or host) would."""
    with runtime.session() as s:
        s.execute(update(ApiBudget).values(**values))


def budget() -> dict:
    with runtime.session() as s:
        return limits.status(s)


def seconds_until(when) -> float:
    return (when - utcnow()).total_seconds()


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


@pytest.mark.parametrize(
    "args, kwargs, expect_id, field",
    [
        ((), {"job_id": "no-request"}, "no-request", "request"),
        ((), {"request": "a string", "job_id": "str-request"}, "str-request", "request"),
        ((), {"request": {"prompt": "x"}, "job_id": "x" * 65}, "delivery-1", "job_id"),
        ((), {"request": {"prompt": "x"}, "job_id": 42}, "delivery-1", "job_id"),
        ((), {"request": {"prompt": "x"}, "priority": 1}, "delivery-1", "priority"),
        (({"prompt": "x"},), {}, "delivery-1", "keyword arguments"),
    ],
)
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
    for _ in range(2):
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


def test_account_errors_keep_jobs_waiting_and_pause_the_fleet(service, caplog):
    caplog.set_level("ERROR")
    service.set_faults(no_balance=True)
    for _ in range(5):  # more tries than KLING_MAX_ATTEMPTS: account trouble never fails a job
        out = handle(request={"prompt": "x"}, job_id="broke")
        assert out.status is JobStatus.queued and out.retry_in >= 15
    row = job("broke")
    assert row.status == "queued" and row.error_code == "402" and row.attempts == 0
    assert service.stats()["requests"] == 1  # the pause held back the other four tries
    paused = budget()
    assert paused["paused_for"] > 20 and "402" in paused["pause_reason"]
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "402" in errors[0].getMessage() and "broke" in errors[0].getMessage()

    set_budget(paused_until=0)  # as if the pause had run out; the balance is still empty
    limits.forget()
    assert handle(request={"prompt": "x"}, job_id="broke").status is JobStatus.queued
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and "402" in errors[1].getMessage()  # each try that reaches the API says so

    service.set_faults(no_balance=False)
    set_budget(paused_until=0)
    limits.forget()
    assert handle(request={"prompt": "x"}, job_id="broke").status is JobStatus.submitted


def test_a_400_from_the_api_fails_the_job_with_its_message(service):
    service.script(Step(400, on="submit"))
    out = handle(request={"prompt": "x"}, job_id="refused")
    row = job("refused")
    assert out.status is JobStatus.failed and row.error_code == "400" and "Bad Request" in row.error_message
    assert row.attempts == 1 and row.finished_at


def test_a_full_fleet_sends_the_job_back_within_ten_seconds(service, configure):
    configure(MODELLIX_MAX_IN_FLIGHT="1")
    submitted("running")
    # A redelivery that has backed off many times: the backoff would say 60 s, the budget recheck says 10.
    out = submission.handle((), {"request": {"prompt": "x"}, "job_id": "waiting"}, "d", retries=10)
    assert out.status is JobStatus.queued and 5 <= out.retry_in <= 10
    row = job("waiting")
    assert row.status == "queued" and row.attempts == 0
    assert service.stats()["submits"] == 1


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


def test_a_429_on_submit_pauses_the_fleet_and_holds_back_other_jobs(service):
    service.script(Step(429, on="submit", retry_after=8))
    first = handle(request={"prompt": "x"}, job_id="hit")
    assert first.status is JobStatus.queued and first.retry_in >= 8
    paused = budget()
    assert 6 < paused["paused_for"] <= 8 and "429" in paused["pause_reason"]
    other = handle(request={"prompt": "y"}, job_id="held")
    assert other.status is JobStatus.queued and other.retry_in > 5
    assert service.stats()["requests"] == 1  # the second job never reached the API
    row = job("held")
    assert row.status == "queued" and row.attempts == 0  # waiting for the pause costs no attempt


@pytest.mark.parametrize("max_rps", [None, "50"])
def test_a_pause_set_by_another_worker_holds_this_one_back(service, configure, max_rps):
    if max_rps:
        configure(MODELLIX_MAX_RPS=max_rps)
    set_budget(paused_until=time.time() + 30, pause_reason="429 from Modellix")  # another worker's write
    out = handle(request={"prompt": "x"}, job_id="held")
    assert out.status is JobStatus.queued and out.retry_in >= 25
    assert service.stats()["requests"] == 0


def test_a_pause_written_after_this_worker_looked_is_seen_within_a_second(service):
    submitted("before")  # this process has read the budget row and cached "no pause"
    set_budget(paused_until=time.time() + 30, pause_reason="429 from Modellix")
    time.sleep(limits.PAUSE_REFRESH + 0.1)
    assert handle(request={"prompt": "y"}, job_id="after").status is JobStatus.queued
    assert service.stats()["submits"] == 1


def test_a_submit_over_the_rate_budget_waits_in_the_queue_without_an_attempt(service, configure):
    configure(MODELLIX_MAX_RPS="1")
    set_budget(next_slot=time.time() + 100)  # the fleet has booked the next 100 s of requests
    out = handle(request={"prompt": "x"}, job_id="later")
    assert out.status is JobStatus.queued and 95 <= out.retry_in <= 102
    row = job("later")
    assert row.status == "queued" and row.attempts == 0
    assert service.stats()["requests"] == 0


def test_a_poll_over_the_rate_budget_is_given_back_and_rescheduled(service, configure):
    submitted("p")
    configure(MODELLIX_MAX_RPS="1")
    set_budget(next_slot=time.time() + 40)
    following = tracking.poll("p", 0)
    assert following is not None and following[0] == 0 and 35 <= following[1] <= 42  # the same poll, later
    row = job("p")
    assert row.polls == 0 and row.status == "submitted" and 35 <= seconds_until(row.next_poll_at) <= 42
    assert service.stats()["polls"] == 0


def test_dropped_connection_during_submit_fails_as_unknown_and_is_never_resent(service):
    service.script(Step("drop", on="submit"))
    out = handle(request={"prompt": "x"}, job_id="dropped")
    row = job("dropped")
    assert out.status is JobStatus.failed and row.error_code == "submit_unknown" and row.modellix_task_id is None
    assert handle(request={"prompt": "x"}, job_id="dropped").status is None  # a redelivery does nothing
    assert service.stats()["submits"] == 1


def test_a_submit_answered_without_a_task_id_fails_as_unknown(service):
    service.script(Step("no_task_id"))
    out = handle(request={"prompt": "x"}, job_id="no-id")
    row = job("no-id")
    assert out.status is JobStatus.failed and row.error_code == "submit_unknown" and "task_id" in row.error_message
    assert service.stats()["submits"] == 1


def test_cancel_keeps_a_waiting_job_from_being_submitted(service):
    service.set_faults(rate_503=1.0)
    assert handle(request={"prompt": "x"}, job_id="c1").status is JobStatus.queued
    assert cli.main(["jobs", "cancel", "c1"]) == 0
    service.set_faults(rate_503=0.0)
    assert handle(request={"prompt": "x"}, job_id="c1").status is None  # the retried message
    row = job("c1")
    assert row.status == "cancelled" and row.error_code == "cancelled" and row.finished_at
    assert service.stats()["submits"] == 0
    assert cli.main(["jobs", "cancel", "c1"]) == 1  # terminal stays terminal


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


def test_pending_means_submitted_and_any_other_running_status_processing(service):
    service.task_seconds = 30
    submitted("p")
    following = tracking.poll("p", 0)
    assert following is not None and job("p").status == "submitted"  # Modellix says pending
    service.script(Step("status:running"))
    assert tracking.poll("p", following[0]) is not None
    row = job("p")
    assert row.status == "processing" and row.last_response["status"] == "running" and row.polls == 2


def test_a_429_while_polling_honours_retry_after_and_pauses_the_fleet(service):
    submitted("p")
    service.script(Step(429, on="poll", retry_after=7))
    following = tracking.poll("p", 0)
    assert following is not None and following[0] == 1 and following[1] >= 7
    row = job("p")
    assert row.status == "submitted" and row.polls == 1 and seconds_until(row.next_poll_at) >= 6
    paused = budget()
    assert 5 < paused["paused_for"] <= 7 and "429" in paused["pause_reason"]


@pytest.mark.parametrize("status", [401, 402])
def test_account_errors_while_polling_slow_the_polls_and_pause_the_fleet(service, caplog, status):
    submitted("p")
    service.script(Step(status, on="poll"))
    following = tracking.poll("p", 0)
    assert following is not None and following[1] >= 30  # KLING_ACCOUNT_RETRY
    row = job("p")
    assert row.status == "submitted" and row.finished_at is None  # the task is not given up
    paused = budget()
    assert paused["paused_for"] > 25 and str(status) in paused["pause_reason"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "job p" in errors[0] and "account" in errors[0]


def test_not_found_while_polling_fails_the_job(service):
    submitted("p")
    service.script(Step(404, on="poll"))
    assert tracking.poll("p", 0) is None
    row = job("p")
    assert row.status == "failed" and row.error_code == "404" and row.next_poll_at is None


def test_an_answer_for_another_task_is_retried_not_trusted(service):
    submitted("p")
    service.script(Step("wrong_task_id"))
    following = tracking.poll("p", 0)
    assert following is not None and following[0] == 1
    row = job("p")
    assert row.status == "submitted" and row.result_urls is None


def test_success_without_results_fails_as_no_results(service):
    submitted("p")
    service.script(Step("no_results"))
    assert tracking.poll("p", 0) is None
    row = job("p")
    assert row.status == "failed" and row.error_code == "no_results" and row.last_response["status"] == "success"


def test_an_unknown_status_is_logged_and_followed_as_running(service, caplog):
    submitted("p")
    service.script(Step("status:rendering"))
    following = tracking.poll("p", 0)
    assert following is not None
    assert job("p").status == "processing"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("rendering" in w and "job p" in w for w in warnings)


def test_deadline_reached_while_polls_keep_failing(service):
    submitted("p")
    service.set_faults(rate_503=1.0)
    assert tracking.poll("p", 0) is not None  # a failed poll before the deadline: try again
    with runtime.session() as s:
        s.execute(update(Job).where(Job.id == "p").values(submitted_at=utcnow() - timedelta(seconds=61)))
    assert tracking.poll("p", 1) is None
    row = job("p")
    assert row.status == "failed" and row.error_code == "timeout"


def test_sweep_leaves_polls_that_are_late_by_less_than_the_slack(service):
    submitted("late")
    submitted("lost")
    now = utcnow()
    with runtime.session() as s:
        s.execute(update(Job).where(Job.id == "late").values(next_poll_at=now - timedelta(seconds=5)))
        s.execute(update(Job).where(Job.id == "lost").values(next_poll_at=now - timedelta(seconds=12)))
    assert tracking.sweep() == [("lost", 0)]


def test_sweep_waits_for_the_submit_grace(service, configure):
    configure(KLING_SUBMIT_GRACE=30)
    now = utcnow()
    with runtime.session() as s:
        for job_id, age in (("young", 20), ("old", 40)):
            when = now - timedelta(seconds=age)
            s.add(
                Job(
                    id=job_id,
                    status="submitting",
                    request={"prompt": "x"},
                    attempts=1,
                    created_at=when,
                    updated_at=when,
                )
            )
    tracking.sweep()
    assert job("young").status == "submitting"
    assert (job("old").status, job("old").error_code) == ("failed", "submit_interrupted")


def test_sweep_redispatches_overdue_polls_and_resolves_interrupted_submits(service, configure):
    configure(KLING_SUBMIT_GRACE=5)
    handle(request={"prompt": "x"}, job_id="lost-poll")
    past = utcnow() - timedelta(seconds=60)
    with runtime.session() as s:
        s.execute(update(Job).where(Job.id == "lost-poll").values(next_poll_at=past))
        s.add(
            Job(id="stuck", status="submitting", request={"prompt": "x"}, attempts=1, created_at=past, updated_at=past)
        )
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
    set_budget(paused_until=0)  # lift the fleet pause the 401 set
    # Answers that echo the request headers, key included, on a submit and on a poll.
    service.script(Step("echo", on="submit"))
    handle(request={"prompt": "y"}, job_id="k2")
    assert handle(request={"prompt": "z"}, job_id="k3").status is JobStatus.submitted
    service.script(Step("echo", on="poll"))
    assert tracking.poll("k3", 0) is not None  # a failed poll is logged and made again later
    with runtime.session() as s:
        dumped = repr([j.to_dict() for j in s.query(Job)])
    assert "401" in dumped and "Bearer ***" in dumped  # the echoes did leave their trace...
    assert caplog.text.count("Bearer ***") == 2
    for text in (dumped, caplog.text, repr(runtime.settings())):
        assert secret not in text and service.api_key not in text  # ...but never the key itself
