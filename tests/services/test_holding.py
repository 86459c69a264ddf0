"""Answers held through a database outage (worker.facts) and the claims and polls it interrupts.

The outage is real: this process's database connections go through a TCP
proxy of the test's own (worker/dev/proxy.py), which the test cuts and restores.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.exc import DBAPIError

from models import JobStatus, db, lifecycle
from models.job import Job, utcnow
from tests.support.jobs import handle, job, submitted, take_and_send, wait_for
from tests.unit.test_lifecycle import refuse_outbox_rows
from worker import facts, resources, submission
from worker.dev.proxy import TcpProxy
from worker.facts import Claimed, Fact, Kept, Submitted, Succeeded
from worker.ops import outages
from worker.polling import tracking
from worker.polling.schedule import NextPoll

pytestmark = pytest.mark.services


@pytest.fixture
def proxy(pg_url, sandbox, configure):
    """This process as a worker against the sandbox, its PostgreSQL behind a proxy the test can cut."""
    proxy = TcpProxy("127.0.0.1", 5432)
    configure(
        DATABASE_URL=pg_url.replace(":5432", f":{proxy.port}"),
        MODELLIX_BASE_URL=sandbox.url,
        MODELLIX_API_KEY=sandbox.api_key,
        KLING_POLL_DEADLINE=60,
    )
    yield proxy
    proxy.close()


def claimed(job_id: str) -> Job:
    with resources.get().statement() as ex:
        assert lifecycle.create(ex, job_id, JobStatus.queued, {"prompt": "x"}, None, utcnow())
        assert lifecycle.take(ex, job_id, utcnow()).attempt == 1
    return job(job_id)


def keep_in_thread(fact: Fact) -> tuple[threading.Thread, list[Kept]]:
    result: list[Kept] = []
    thread = threading.Thread(target=lambda: result.append(facts.keep(resources.get(), fact)), daemon=True)
    thread.start()
    return thread, result


def answer(job_id: str) -> Submitted:
    return Submitted(job_id, utcnow(), task_id="task-1", answer={"status": "pending"}, first_poll=2)


def test_an_answer_met_by_an_outage_is_held_until_the_database_returns(proxy):
    claimed("held")
    proxy.cut()
    thread, result = keep_in_thread(answer("held"))
    time.sleep(1.5)
    assert thread.is_alive() and resources.get().outage.down  # held, not dropped, not raised
    proxy.restore()
    thread.join(5)
    assert result == [Kept.written] and not resources.get().outage.down
    row = job("held")
    assert row.status == "submitted" and row.modellix_task_id == "task-1"
    assert row.next_poll_at == row.submitted_at + timedelta(seconds=2)


def test_a_stopping_process_gives_a_held_answer_back_to_hand_on(proxy):
    claimed("stop")
    proxy.cut()
    thread, result = keep_in_thread(answer("stop"))
    time.sleep(0.5)
    resources.get().stopping.set()
    thread.join(3)
    assert result == [Kept.to_hand_on]
    proxy.restore()
    assert job("stop").status == "submitting"  # nothing was written: the fact travels on


def test_an_outage_at_the_turn_sends_nothing_and_the_job_keeps_its_place(proxy, sandbox):
    message = {"request": {"prompt": "x"}, "job_id": "cut"}
    assert submission.handle(resources.get(), (), message, "m").status is JobStatus.queued
    proxy.cut()
    with pytest.raises(DBAPIError) as caught:
        take_and_send()
    assert db.unreachable(caught.value)  # the taker backs off and looks again (worker.wiring.dispatcher)
    proxy.restore()
    row = job("cut")
    assert (row.status, row.attempts) == ("queued", 0) and sandbox.stats()["requests"] == 0
    assert take_and_send().status is JobStatus.submitted and job("cut").attempts == 1
    assert sandbox.stats()["submits"] == 1


def carrying(fact: Fact) -> submission.Outcome:
    """The message a worker that had to let go sends with the fact (worker.wiring.tasks.carry_on)."""
    return submission.handle(resources.get(), (), {"job_id": fact.job_id, submission.CARRIED: fact.to_json()}, "m")


def test_a_claim_committed_unseen_is_released_by_the_fact_carried_on_and_only_that_claim(proxy, sandbox):
    row = claimed("unseen")  # as if the commit's answer was lost with the connection
    carrying(Claimed("unseen", row.updated_at - timedelta(microseconds=1)))
    assert job("unseen").status == "submitting"  # another thread's claim is never released
    out = carrying(Claimed("unseen", row.updated_at))
    row = job("unseen")
    assert out == submission.Outcome("unseen", JobStatus.queued)
    assert (row.status, row.attempts) == ("queued", 0)  # back in its place, the attempt refunded
    assert take_and_send().status is JobStatus.submitted and job("unseen").attempts == 1
    assert sandbox.stats()["submits"] == 1


def test_an_answer_handed_on_is_written_by_the_next_delivery_without_sending_again(proxy, sandbox):
    claimed("carried")
    out = handle(request={"prompt": "x"}, job_id="carried", **{submission.CARRIED: answer("carried").to_json()})
    row = job("carried")
    assert out.status.value == "submitted" and isinstance(out.next_step, submission.Follow)
    assert out.next_step.first_poll.seq == 0 and 0 < out.next_step.first_poll.delay <= 2
    assert row.status == "submitted" and row.modellix_task_id == "task-1"
    assert sandbox.stats()["submits"] == 0


def test_a_poll_met_by_an_outage_waits_without_raising(proxy):
    submitted("polled")
    proxy.cut()
    put_off = tracking.PollAgain(NextPoll(0, outages.OUTAGE_RECHECK))
    assert tracking.check(resources.get(), "polled", 0) == put_off  # the poll was not claimed
    proxy.restore()
    assert isinstance(tracking.check(resources.get(), "polled", 0), tracking.PollAgain) and job("polled").polls == 1


def test_the_sweep_waits_out_an_outage_and_then_leaves_stale_submits_alone_a_while(proxy, monkeypatch):
    claimed("stale")
    with resources.get().transaction() as s:
        s.execute(update(Job).values(updated_at=utcnow() - timedelta(hours=1)))
    proxy.cut()
    assert tracking.sweep(resources.get()) == []  # no traceback, nothing done
    proxy.restore()
    monkeypatch.setattr(tracking, "AFTER_OUTAGE", 1.0)
    tracking.sweep(resources.get())
    assert job("stale").status == "submitting"  # a held answer may still be on its way
    time.sleep(1.0)
    wait_for(
        lambda: tracking.sweep(resources.get()) is not None and job("stale").status == "failed",
        5,
        "the sweep resolves it",
    )
    assert job("stale").error_code == "submit_interrupted"


def test_a_jobs_end_is_written_with_its_outbox_rows_or_not_at_all(pg_url, configure):
    """On PostgreSQL a lone statement commits at once (autocommit): the end of a job must go through a
    transaction with its outbox rows, so that rows refused by the database take the end back with them."""
    configure(DATABASE_URL=pg_url)
    res = resources.get()
    now = utcnow()
    with res.transaction() as s:
        s.add(Job(id="hooked", status="processing", request={}, created_at=now, updated_at=now, webhook="https://h/x"))
    refuse_outbox_rows(res.engine)
    ended = Succeeded("hooked", utcnow(), result_urls=["https://r/0.png"], answer={"status": "success"})
    with pytest.raises(DBAPIError, match="outbox refused"):
        facts.keep(res, ended)
    assert job("hooked").status == "processing" and job("hooked").finished_at is None
