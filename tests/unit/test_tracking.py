"""Following a submitted task: each poll's outcome, the deadline, and the sweep."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from models.job import Job, utcnow
from tests.support.jobs import budget, handle, job, seconds_until, submitted
from worker import resources
from worker.dev.sandbox import Step
from worker.modellix.policy import BALANCE_RECHECK
from worker.polling import tracking
from worker.polling.schedule import NextPoll
from worker.polling.tracking import Ended, PollAgain, Skipped


def check(job_id: str, seq: int) -> tracking.PollOutcome:
    return tracking.check(resources.get(), job_id, seq)


def test_polls_until_success_and_records_the_urls(service):
    handle(request={"prompt": "x", "n": 2}, job_id="p")
    assert check("p", 0) == PollAgain(NextPoll(1, 2.5))  # the schedule's second gap
    assert check("p", 0) == Skipped()  # a stale or duplicate poll message does nothing
    time.sleep(service.task_seconds)
    assert check("p", 1) == Ended("p", notify=False)
    row = job("p")
    assert row.status == "succeeded" and len(row.result_urls) == 2 and row.polls == 2
    assert row.last_response["status"] == "success" and row.next_poll_at is None


def test_a_failed_task_fails_the_job_with_its_message(service):
    service.set_faults(fail_rate=1.0)
    handle(request={"prompt": "x"}, job_id="f")
    time.sleep(service.task_seconds)
    assert check("f", 0) == Ended("f", notify=False)
    row = job("f")
    assert row.status == "failed" and row.error_code == "task_failed" and "Generation failed" in row.error_message
    assert row.finished_at and row.next_poll_at is None and row.last_response["status"] == "failed"


def test_a_task_still_running_at_the_deadline_times_out(service):
    service.task_seconds = 60
    submitted("slow")
    with resources.get().transaction() as s:
        s.execute(update(Job).where(Job.id == "slow").values(submitted_at=utcnow() - timedelta(seconds=61)))
    assert check("slow", 0) == Ended("slow", notify=False)
    row = job("slow")
    assert row.status == "failed" and row.error_code == "timeout" and "deadline" in row.error_message


def test_the_next_poll_never_lands_past_the_deadline(service):
    service.task_seconds = 60
    submitted("p")
    with resources.get().transaction() as s:  # half a second of the 60 s deadline left
        s.execute(update(Job).where(Job.id == "p").values(submitted_at=utcnow() - timedelta(seconds=59.5)))
    following = check("p", 0)
    assert isinstance(following, PollAgain) and following.poll.delay <= 0.5


def test_pending_means_submitted_and_any_other_running_status_processing(service):
    service.task_seconds = 30
    submitted("p")
    following = check("p", 0)
    assert isinstance(following, PollAgain) and job("p").status == "submitted"  # Modellix says pending
    service.script(Step("status:running"))
    assert isinstance(check("p", following.poll.seq), PollAgain)
    row = job("p")
    assert row.status == "processing" and row.last_response["status"] == "running" and row.polls == 2


def test_a_429_while_polling_honours_retry_after_and_pauses_the_fleet(service):
    submitted("p")
    service.script(Step(429, on="poll", retry_after=7))
    following = check("p", 0)
    assert isinstance(following, PollAgain) and following.poll.seq == 1 and following.poll.delay >= 7
    row = job("p")
    assert row.status == "submitted" and row.polls == 1 and seconds_until(row.next_poll_at) >= 6
    paused = budget()
    assert 5 < paused["paused_for"] <= 7 and "429" in paused["pause_reason"]


@pytest.mark.parametrize("status", [401, 402])
def test_account_errors_while_polling_slow_the_polls_and_pause_the_fleet(service, caplog, status):
    submitted("p")
    service.script(Step(status, on="poll"))
    following = check("p", 0)
    # KLING_ACCOUNT_RETRY; for a 402, BALANCE_RECHECK, as the sweep lifts the pause on a top-up
    assert isinstance(following, PollAgain) and following.poll.delay >= (30 if status == 401 else BALANCE_RECHECK)
    row = job("p")
    assert row.status == "submitted" and row.finished_at is None  # the task is not given up
    paused = budget()
    assert paused["paused_for"] > 25 and str(status) in paused["pause_reason"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "job p" in errors[0] and "account" in errors[0]


def test_not_found_while_polling_fails_the_job(service):
    submitted("p")
    service.script(Step(404, on="poll"))
    assert check("p", 0) == Ended("p", notify=False)
    row = job("p")
    assert row.status == "failed" and row.error_code == "404" and row.next_poll_at is None
    assert row.error_message.startswith("Not Found") and row.finished_at


def test_an_answer_for_another_task_is_retried_not_trusted(service):
    submitted("p")
    service.script(Step("wrong_task_id"))
    following = check("p", 0)
    assert isinstance(following, PollAgain) and following.poll.seq == 1
    row = job("p")
    assert row.status == "submitted" and row.result_urls is None


def test_success_without_results_fails_as_no_results(service):
    submitted("p")
    service.script(Step("no_results"))
    assert check("p", 0) == Ended("p", notify=False)
    row = job("p")
    assert row.status == "failed" and row.error_code == "no_results" and row.last_response["status"] == "success"
    assert row.modellix_task_id in row.error_message and "result URL" in row.error_message


def test_an_unknown_status_is_logged_and_followed_as_running(service, caplog):
    submitted("p")
    service.script(Step("status:rendering"))
    assert isinstance(check("p", 0), PollAgain)
    assert job("p").status == "processing"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("rendering" in w and "job p" in w for w in warnings)


def test_deadline_reached_while_polls_keep_failing(service):
    submitted("p")
    service.set_faults(rate_503=1.0)
    assert isinstance(check("p", 0), PollAgain)  # a failed poll before the deadline: try again
    with resources.get().transaction() as s:
        s.execute(update(Job).where(Job.id == "p").values(submitted_at=utcnow() - timedelta(seconds=61)))
    assert check("p", 1) == Ended("p", notify=False)
    row = job("p")
    assert row.status == "failed" and row.error_code == "timeout"


def test_sweep_leaves_polls_that_are_late_by_less_than_the_slack(service):
    submitted("late")
    submitted("lost")
    now = utcnow()
    with resources.get().transaction() as s:
        s.execute(update(Job).where(Job.id == "late").values(next_poll_at=now - timedelta(seconds=5)))
        s.execute(update(Job).where(Job.id == "lost").values(next_poll_at=now - timedelta(seconds=12)))
    assert tracking.sweep(resources.get()) == [("lost", 0)]


def test_sweep_waits_for_the_submit_grace(service, configure):
    configure(KLING_SUBMIT_GRACE=60)
    now = utcnow()
    with resources.get().transaction() as s:
        for job_id, age in (("young", 45), ("old", 75)):
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
    tracking.sweep(resources.get())
    assert job("young").status == "submitting"
    assert (job("old").status, job("old").error_code) == ("failed", "submit_interrupted")


def test_sweep_redispatches_an_overdue_poll_once(service):
    submitted("lost-poll")
    with resources.get().transaction() as s:
        s.execute(update(Job).where(Job.id == "lost-poll").values(next_poll_at=utcnow() - timedelta(seconds=60)))
    assert tracking.sweep(resources.get()) == [("lost-poll", 0)]
    assert tracking.sweep(resources.get()) == []  # leased: not dispatched twice


def test_sweep_fails_a_job_left_submitting_as_interrupted(service, configure):
    configure(KLING_SUBMIT_GRACE=50)
    past = utcnow() - timedelta(seconds=60)
    with resources.get().transaction() as s:
        s.add(
            Job(id="stuck", status="submitting", request={"prompt": "x"}, attempts=1, created_at=past, updated_at=past)
        )
    assert tracking.sweep(resources.get()) == []
    row = job("stuck")
    assert row.status == "failed" and row.error_code == "submit_interrupted" and row.finished_at
    assert "not submitted again" in row.error_message


@pytest.mark.parametrize("word", ["pending", "processing", "running", "queued", "submitted", "PENDING", "Running"])
def test_known_running_statuses_are_followed_quietly(service, caplog, word):
    submitted("p")
    service.script(Step(f"status:{word}"))
    assert isinstance(check("p", 0), PollAgain)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


# -- what each outcome says in the log, and the sweep's edges --------------------------


def tracking_lines(caplog) -> list[tuple[str, str, str | None]]:
    return [
        (r.levelname, r.getMessage(), getattr(r, "event", None))
        for r in caplog.records
        if r.name == "kling_worker.tracking"
    ]


def test_a_poll_that_ends_the_job_logs_the_code_and_message_as_job_failed(service, caplog):
    submitted("p")
    service.script(Step(404, on="poll"))
    assert check("p", 0) == Ended("p", notify=False)
    assert tracking_lines(caplog) == [("WARNING", "job p failed: 404 Not Found: scripted", "job_failed")]


def test_an_account_error_while_polling_is_logged_as_fleet_paused(service, caplog):
    submitted("p")
    service.script(Step(401, on="poll"))
    assert isinstance(check("p", 0), PollAgain)
    assert tracking_lines(caplog) == [
        (
            "ERROR",
            "job p: Modellix rejects the account while polling (Unauthorized: scripted); polling slowly",
            "fleet_paused",
        )
    ]


def test_a_failed_poll_is_logged_with_its_next_gap_as_poll_failed(service, caplog):
    caplog.set_level(logging.INFO)
    submitted("p")
    service.script(Step(503, on="poll"))
    following = check("p", 0)
    assert isinstance(following, PollAgain)
    assert tracking_lines(caplog) == [
        (
            "INFO",
            f"job p: poll failed (Service Unavailable: scripted); next poll in {following.poll.delay:.1f}s",
            "poll_failed",
        )
    ]


def test_the_sweep_logs_the_polls_it_redispatches(service, caplog):
    for job_id in ("a", "b"):
        submitted(job_id)
    with resources.get().transaction() as s:
        s.execute(update(Job).values(next_poll_at=utcnow() - timedelta(seconds=60)))
    assert sorted(tracking.sweep(resources.get())) == [("a", 0), ("b", 0)]
    assert tracking_lines(caplog) == [("WARNING", "re-dispatching 2 overdue polls", "polls_redispatched")]


def test_a_sweep_the_database_refuses_is_counted_as_put_off_sweeps(service, monkeypatch, caplog):
    def refused(*args, **kwargs):
        raise OperationalError("SELECT", {}, Exception("connection refused"))

    monkeypatch.setattr(tracking.store, "claim_overdue_polls", refused)
    res = resources.get()
    assert tracking.sweep(res) == []
    assert res.outage.down
    res.outage.ok(time.monotonic())  # its end line tallies what was put off
    ended = [r.getMessage() for r in caplog.records if r.name == "kling_worker.outages"][-1]
    assert "put off meanwhile: 1 sweeps;" in ended


@pytest.mark.parametrize("quiet, resolved", [(tracking.AFTER_OUTAGE, True), (tracking.AFTER_OUTAGE - 0.5, False)])
def test_the_sweep_fails_stale_submits_once_the_database_has_been_back_long_enough(
    service, configure, monkeypatch, quiet, resolved
):
    configure(KLING_SUBMIT_GRACE=50)
    past = utcnow() - timedelta(seconds=60)
    with resources.get().transaction() as s:
        s.add(
            Job(id="stuck", status="submitting", request={"prompt": "x"}, attempts=1, created_at=past, updated_at=past)
        )
    res = resources.get()
    monkeypatch.setattr(res.outage, "quiet_for", lambda: quiet)
    tracking.sweep(res)
    assert job("stuck").status == ("failed" if resolved else "submitting")


def test_interrupted_submits_get_the_documented_message_and_one_log_line_naming_twenty(service, caplog):
    past = utcnow() - timedelta(seconds=600)
    ids = [f"stuck-{i:02}" for i in range(21)]
    with resources.get().transaction() as s:
        for job_id in ids:
            s.add(
                Job(
                    id=job_id,
                    status="submitting",
                    request={"prompt": "x"},
                    attempts=1,
                    created_at=past,
                    updated_at=past,
                )
            )
    assert tracking.resolve_interrupted(resources.get(), utcnow()) == 21
    row = job("stuck-00")
    assert (row.status, row.error_code) == ("failed", "submit_interrupted")
    assert row.error_message == (
        "the worker stopped while submitting; the Modellix task may exist "
        "but its id is unknown, so the job is not submitted again"
    )
    ((level, message, event),) = tracking_lines(caplog)
    assert (level, event) == ("WARNING", "submits_interrupted")
    head, listed = message.split(": ", 1)
    assert head == "21 jobs interrupted during submission marked failed"
    named = listed.split(", ")
    assert len(named) == 20 and set(named) < set(ids)


def test_no_interrupted_submit_no_log_line(service, caplog):
    assert tracking.resolve_interrupted(resources.get(), utcnow()) == 0
    assert tracking_lines(caplog) == []
