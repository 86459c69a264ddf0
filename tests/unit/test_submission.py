"""A message: validate → claim → send → record, in this process, on SQLite and PostgreSQL and the sandbox.

Celery only carries messages; these tests drive the same function its task calls.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from datetime import timedelta

import pytest

from models import JobStatus, lifecycle
from models.job import utcnow
from tests.support.jobs import (
    budget,
    due_in,
    handle,
    job,
    make_due,
    seconds_until,
    set_budget,
    submitted,
    take_and_send,
)
from tests.support.metrics import sample
from worker import cli, resources, submission
from worker.dev.sandbox import Step, png
from worker.facts import Claimed, Kept, SubmitFailed, Submitted
from worker.fleet import places
from worker.fleet.waiting import OverBudget
from worker.polling.schedule import NextPoll


def test_valid_request_is_submitted_once(service):
    first = handle(request={"prompt": "a cat"}, job_id="j1", metadata={"user": 7})
    again = handle(request={"prompt": "a cat"}, job_id="j1")
    assert first.status is JobStatus.submitted and first.next_step == submission.Follow(NextPoll(0, 2.0))
    assert again.status is None and again.next_step == submission.Finished()  # duplicate: nothing done
    row = job("j1")
    assert row.status == "submitted" and row.modellix_task_id and row.attempts == 1 and row.meta == {"user": 7}
    assert row.last_response["task_id"] == row.modellix_task_id and row.submitted_at
    assert 1.0 <= seconds_until(row.next_poll_at) <= 2.0  # the first poll is due 2 s after submission
    assert service.stats()["submits"] == 1


def test_job_id_defaults_to_the_message_id(service):
    assert handle(request={"prompt": "a cat"}).job_id == "message-1"


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
        ((), {"request": {"prompt": "x"}, "job_id": "x" * 65}, "message-1", "job_id"),
        ((), {"request": {"prompt": "x"}, "job_id": 42}, "message-1", "job_id"),
        ((), {"request": {"prompt": "x"}, "priority": "high"}, "message-1", "priority"),
        ((), {"request": {"prompt": "x"}, "tenant": "web shop"}, "message-1", "tenant"),
        ((), {"request": {"prompt": "x"}, "colour": "red"}, "message-1", "colour"),
        (({"prompt": "x"},), {}, "message-1", "keyword arguments"),
    ],
)
def test_malformed_messages_are_recorded_not_raised(service, args, kwargs, expect_id, field):
    out = submission.handle(resources.get(), args, kwargs, "message-1")
    row = job(expect_id)
    assert out.status is JobStatus.rejected and row.status == "rejected" and field in row.error_message


def test_large_invalid_request_is_not_stored_whole(service):
    request = {"prompt": "x", "image_list": [{"image": "data:image/png;base64," + "A" * 200_000}]}
    handle(request=request, job_id="big")
    row = job("big")
    canonical = json.dumps(request, ensure_ascii=False, sort_keys=True)
    assert row.status == "rejected" and row.request == {
        "_omitted": True,
        "bytes": len(canonical),
        "sha256": hashlib.sha256(canonical.encode()).hexdigest(),
    }


def test_a_rejected_job_keeps_the_callers_metadata_and_the_request(service):
    out = handle(request={"prompt": "x", "n": 0}, job_id="bad", metadata={"order": 7, "note": "é"})
    row = job("bad")
    assert out.status is JobStatus.rejected and row.meta == {"order": 7, "note": "é"}
    assert row.request == {"prompt": "x", "n": 0} and row.finished_at is not None


def test_an_invalid_message_reusing_a_job_id_leaves_that_job_alone(service):
    submitted("taken")
    out = handle(request={"prompt": "x", "n": 0}, job_id="taken", metadata={"other": True})
    row = job("taken")
    assert out.duplicate and row.status == "submitted" and row.meta is None and row.error_code is None


def test_by_default_a_5xx_to_a_submit_fails_the_job_as_unknown_and_never_resends_it(service):
    service.set_faults(rate_503=1.0)
    out = handle(request={"prompt": "x"}, job_id="five")
    row = job("five")
    assert out.status is JobStatus.failed and row.status == "failed" and row.attempts == 1
    assert row.error_code == "submit_unknown" and "503" in row.error_message
    assert "not submitted again" in row.error_message
    service.set_faults(rate_503=0.0)
    assert handle(request={"prompt": "x"}, job_id="five").duplicate  # a redelivery sends nothing
    assert service.stats()["submits"] == 0


def test_transient_errors_back_off_then_fail_with_the_last_error(service, configure, caplog):
    configure(KLING_SUBMIT_5XX="retry")
    service.set_faults(rate_503=1.0)
    delays = []
    out = handle(request={"prompt": "x"}, job_id="flaky")
    for _ in range(2):
        row = job("flaky")
        assert out.status is JobStatus.queued and row.status == "queued"
        assert row.error_code == "503" and "Service Unavailable" in row.error_message  # why it waits
        delays.append(due_in("flaky"))
        assert take_and_send() is None  # not due yet: it keeps its place, and nothing is sent
        make_due("flaky")
        out = take_and_send()
    assert 0.05 <= delays[0] <= 0.1 and 0.1 <= delays[1] <= 0.2  # exponential, jittered
    row = job("flaky")
    assert out.status is JobStatus.failed and row.status == "failed" and row.attempts == 3
    assert row.error_code == "503" and "Service Unavailable" in row.error_message
    resends = [r for r in caplog.records if "second task may be created" in r.getMessage()]
    assert len(resends) == 2 and all(r.levelname == "WARNING" for r in resends)


def test_retry_after_is_honoured(service):
    service.set_faults(rate_429=1.0, retry_after=7)
    out = handle(request={"prompt": "x"}, job_id="limited")
    assert out.status is JobStatus.queued and due_in("limited") >= 7 and job("limited").error_code == "429"


def test_account_errors_keep_jobs_waiting_and_pause_the_fleet(service, caplog, monkeypatch):
    caplog.set_level("ERROR")
    monkeypatch.setattr(places, "MAX_HOLD", 0.2)  # the later turns end after a short wait
    service.set_faults(no_balance=True)
    out = handle(request={"prompt": "x"}, job_id="broke")
    assert out.status is JobStatus.queued and due_in("broke") >= 15
    for _ in range(5):  # more turns than KLING_MAX_ATTEMPTS: account trouble never fails a job
        make_due("broke")
        with pytest.raises(OverBudget):
            take_and_send()
    row = job("broke")
    assert row.status == "queued" and row.error_code == "402" and row.attempts == 0
    # The pause held back the other four tries: no paid submit, only (waiting) a question for the balance.
    kinds = [r["kind"] for r in service.requests_log()]
    assert kinds.count("submit") == 1 and set(kinds) <= {"submit", "other"}
    paused = budget()
    assert paused["paused_for"] > 20 and "402" in paused["pause_reason"]
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "402" in errors[0].getMessage() and "broke" in errors[0].getMessage()

    set_budget(paused_until=0)  # as if the pause had run out; the balance is still empty
    resources.reset()
    make_due("broke")
    assert take_and_send().status is JobStatus.queued
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and "402" in errors[1].getMessage()  # each try that reaches the API says so

    service.set_faults(no_balance=False)
    set_budget(paused_until=0)
    resources.reset()
    make_due("broke")
    assert take_and_send().status is JobStatus.submitted


def test_a_400_from_the_api_fails_the_job_with_its_message(service):
    service.script(Step(400, on="submit"))
    out = handle(request={"prompt": "x"}, job_id="refused")
    row = job("refused")
    assert out.status is JobStatus.failed and row.error_code == "400" and "Bad Request" in row.error_message
    assert row.attempts == 1 and row.finished_at


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


def test_cancel_keeps_a_waiting_job_from_being_submitted(service, configure):
    configure(KLING_SUBMIT_5XX="retry")
    service.set_faults(rate_503=1.0)
    assert handle(request={"prompt": "x"}, job_id="c1").status is JobStatus.queued
    assert cli.main(["jobs", "cancel", "c1"]) == 0
    service.set_faults(rate_503=0.0)
    make_due("c1")
    assert take_and_send() is None  # nothing left in the line
    assert handle(request={"prompt": "x"}, job_id="c1").status is None  # a redelivered message
    row = job("c1")
    assert row.status == "cancelled" and row.error_code == "cancelled" and row.finished_at
    assert service.stats()["submits"] == 0
    assert cli.main(["jobs", "cancel", "c1"]) == 1  # terminal stays terminal


def test_metadata_that_is_not_an_object_is_not_stored(service):
    out = submission.handle(resources.get(), ({"prompt": "x"},), {"metadata": "just text"}, "positional")
    row = job("positional")
    assert out.status is JobStatus.rejected and row.meta is None and "keyword arguments" in row.error_message


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((), {"request": {"prompt": "x"}, "priority": "high", "metadata": {"k": 1}}),
        (({"prompt": "y"},), {"request": {"prompt": "x"}, "metadata": {"k": 1}}),
    ],
)
def test_a_malformed_message_keeps_its_request_and_metadata(service, args, kwargs):
    submission.handle(resources.get(), args, kwargs, "malformed")
    row = job("malformed")
    assert row.status == "rejected" and row.request == {"prompt": "x"} and row.meta == {"k": 1}


def test_a_job_cancelled_before_any_worker_saw_it_is_never_submitted(service, capsys, caplog):
    caplog.set_level(logging.INFO, "kling_worker")
    assert cli.main(["jobs", "show", "early"]) == 1
    assert "not seen by any worker yet" in capsys.readouterr().err
    assert cli.main(["jobs", "cancel", "early"]) == 0
    assert "recorded as cancelled" in capsys.readouterr().err
    out = handle(request={"prompt": "x"}, job_id="early")  # its message arrives
    row = job("early")
    assert out.duplicate and row.status == "cancelled" and row.finished_at and "before a worker" in row.error_message
    assert service.stats()["submits"] == 0
    assert "early was cancelled before a worker took its message; the message is dropped" in caplog.text
    assert cli.main(["jobs", "cancel", "early"]) == 1
    assert "cancelled, not queued" in capsys.readouterr().err


def test_a_valid_jobs_inline_image_is_stored_as_its_digest_not_its_bytes(service):
    """The request column keeps a data URI's digest and size; the image itself went to Modellix only."""
    data = png(8, 8)
    encoded = base64.b64encode(data).decode()
    request = {"prompt": "a cat like <<<image_1>>>", "image_list": [{"image": "data:image/png;base64," + encoded}]}
    out = handle(request=request, job_id="inline")
    row = job("inline")
    assert out.status is JobStatus.submitted and row.status == "submitted" and service.stats()["submits"] == 1
    digest = hashlib.sha256(data).hexdigest()
    assert row.request == {
        "prompt": "a cat like <<<image_1>>>",
        "image_list": [{"image": f"data:image/png;sha256={digest};bytes={len(data)}"}],
    }
    assert encoded[:40] not in json.dumps(row.request)


def _claimed(job_id: str):
    at = utcnow()
    with resources.get().transaction() as ex:
        assert lifecycle.create(ex, job_id, JobStatus.queued, {"prompt": "x"}, None, at)
        assert lifecycle.take(ex, job_id, at).attempt == 1
    return at


def _carrying(fact) -> submission.Outcome:
    """The message a worker that had to let go sends with the fact (worker.wiring.tasks.carry_on)."""
    kwargs = {"job_id": fact.job_id, submission.CARRIED: fact.to_json()}
    return submission.handle(resources.get(), (), kwargs, "message-2")


def test_a_carried_answer_is_written_and_followed_without_sending_again(service):
    at = _claimed("carried")
    out = _carrying(Submitted("carried", at, task_id="task-1", answer={"status": "pending"}, first_poll=2.0))
    assert out.status is JobStatus.submitted and isinstance(out.next_step, submission.Follow)
    assert out.next_step.first_poll.seq == 0 and 0 < out.next_step.first_poll.delay <= 2.0
    row = job("carried")
    assert row.status == "submitted" and row.modellix_task_id == "task-1"
    assert service.stats()["requests"] == 0  # the answer came with the message: nothing is sent again


def test_a_carried_refusal_ends_the_job_without_sending_again(service):
    at = _claimed("refused")
    out = _carrying(SubmitFailed("refused", at, error_code="400", error_message="bad prompt"))
    assert out.status is JobStatus.failed and out.next_step == submission.Finished()
    row = job("refused")
    assert row.status == "failed" and row.error_code == "400" and row.error_message == "bad prompt"
    assert service.stats()["requests"] == 0


def test_a_carried_claim_is_released_and_the_job_goes_back_to_its_place_in_line(service):
    at = _claimed("released")
    out = _carrying(Claimed("released", at))
    assert out == submission.Outcome("released", JobStatus.queued)
    row = job("released")
    assert (row.status, row.attempts) == ("queued", 0) and service.stats()["requests"] == 0
    assert take_and_send().status is JobStatus.submitted and service.stats()["submits"] == 1


def test_a_valid_message_queues_its_job_in_its_tenants_line_and_sends_nothing(service):
    kwargs = {"request": {"prompt": "x"}, "job_id": "t1", "tenant": "web", "priority": 8}
    out = submission.handle(resources.get(), (), kwargs, "m")
    assert out == submission.Outcome("t1", JobStatus.queued)
    row = job("t1")
    assert (row.status, row.tenant, row.priority, row.attempts, row.payload) == ("queued", "web", 8, 0, None)
    assert row.line == pytest.approx(row.created_at.timestamp() - 8 * 60.0)
    assert service.stats()["requests"] == 0
    before = sample("kling_jobs_submitted_total", tenant="web")
    assert take_and_send().status is JobStatus.submitted
    assert sample("kling_jobs_submitted_total", tenant="web") == before + 1


def test_a_message_without_tenant_or_priority_is_the_default_tenants_at_priority_5(service):
    assert (
        submission.handle(resources.get(), (), {"request": {"prompt": "x"}, "job_id": "d"}, "m").status
        is JobStatus.queued
    )
    row = job("d")
    assert (row.tenant, row.priority) == ("default", 5)


def test_an_inline_image_waits_whole_in_the_payload_and_only_until_it_is_sent(service):
    encoded = base64.b64encode(png(8, 8)).decode()
    request = {"prompt": "like <<<image_1>>>", "image_list": [{"image": "data:image/png;base64," + encoded}]}
    submission.handle(resources.get(), (), {"request": request, "job_id": "inline"}, "m")
    row = job("inline")
    assert row.payload == request and encoded[:40] not in json.dumps(row.request)
    taken = submission.take_next(resources.get())
    assert taken.request == request  # what is sent is the image itself, not its digest
    assert submission.send(resources.get(), taken).status is JobStatus.submitted
    row = job("inline")
    assert row.payload is None and encoded[:40] not in json.dumps(row.request)


@pytest.mark.parametrize(
    "kwargs, tenant",
    [
        ({"request": {"prompt": "x", "n": 0}, "tenant": "web"}, "web"),
        ({"request": {"prompt": "x"}, "tenant": "web", "priority": 11}, "web"),
        ({"request": {"prompt": "x"}, "tenant": "web shop"}, "default"),
    ],
)
def test_a_rejected_job_keeps_its_tenant_if_that_was_valid(service, kwargs, tenant):
    out = submission.handle(resources.get(), (), {**kwargs, "job_id": "r"}, "m")
    row = job("r")
    assert out.status is JobStatus.rejected and (row.status, row.tenant) == ("rejected", tenant)


def test_a_turn_whose_claim_may_have_committed_unseen_releases_it_and_sends_nothing(service):
    """The database goes away as the claim commits: the thread cannot know whether it did, so it
    writes the release (held through the outage), and the job keeps its place in line."""
    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError

    assert submission.handle(resources.get(), (), {"request": {"prompt": "x"}, "job_id": "lost"}, "m").status
    engine = resources.get().engine
    claimed: list[bool] = []
    failed: list[bool] = []

    def executed(conn, cursor, statement, *_) -> None:
        if statement.startswith("UPDATE jobs SET status"):
            claimed.append(True)

    def commit(conn) -> None:
        if claimed and not failed:  # the claim's commit, once
            failed.append(True)
            raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

    event.listen(engine, "after_cursor_execute", executed)
    event.listen(engine, "commit", commit)
    try:
        out = submission.take_next(resources.get())
    finally:
        event.remove(engine, "commit", commit)
        event.remove(engine, "after_cursor_execute", executed)
    assert failed and out == submission.Outcome("lost", JobStatus.queued)
    row = job("lost")
    assert (row.status, row.attempts) == ("queued", 0) and service.stats()["requests"] == 0
    assert take_and_send().status is JobStatus.submitted and job("lost").attempts == 1


def test_a_carried_answer_whose_first_poll_is_past_due_is_polled_at_once(service):
    at = _claimed("late")
    fact = Submitted("late", at - timedelta(seconds=10), task_id="task-1", answer={"status": "pending"}, first_poll=2.0)
    out = _carrying(fact)
    assert out == submission.Outcome("late", JobStatus.submitted, submission.Follow(NextPoll(0, 0.0)))


def test_a_carried_claim_the_database_still_cannot_take_is_handed_on_again(service, monkeypatch):
    at = _claimed("held")
    fact = Claimed("held", at)
    monkeypatch.setattr(submission.facts, "keep", lambda res, f: Kept.to_hand_on)
    out = _carrying(fact)
    assert out == submission.Outcome("held", JobStatus.queued, submission.HandOn(fact))
    assert service.stats()["requests"] == 0  # not sent by this delivery either


@pytest.mark.parametrize(
    "raw, kept",
    [
        ({"prompt": "a" * (64 * 1024 - len('{"prompt": ""}'))}, True),  # exactly the limit, as JSON
        ({"prompt": "a" * (64 * 1024 - len('{"prompt": ""}') + 1)}, False),
        ({"prompt": "é" * 30_000}, True),  # counted in characters, not as \\u00e9 escapes
        (["a list"], False),
    ],
)
def test_an_invalid_request_is_kept_whole_unless_it_is_large(raw, kept):
    stored = submission._storable(raw)
    if kept:
        assert stored is raw
    else:
        text = json.dumps(raw, ensure_ascii=False, sort_keys=True)
        assert stored == {"_omitted": True, "bytes": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()}


def test_an_invalid_request_json_cannot_hold_is_measured_by_its_repr():
    raw = {"tags": {"x" * 70_000}}  # a set: not JSON
    text = repr(raw)
    assert submission._storable(raw) == {
        "_omitted": True,
        "bytes": len(text),
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
    }
    small = {"tags": {1, 2}}
    assert submission._storable(small) is small
