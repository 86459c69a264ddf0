"""The lifecycle table on its own: every allowed and every forbidden transition, on SQLite here and on
PostgreSQL in tests/services/test_lifecycle.py."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from models import TERMINAL, Delivery, JobStatus, lifecycle, store
from models.db import atomic, make_engine, transaction
from models.job import Job, utcnow


@pytest.fixture
def engine(any_db_url):
    eng = make_engine(any_db_url)
    yield eng
    eng.dispose()


def put(engine, job_id: str, status: JobStatus) -> None:
    now = utcnow()
    with transaction(engine) as s:
        s.add(Job(id=job_id, status=status.value, request={"prompt": "x"}, created_at=now, updated_at=now))


def status_of(engine, job_id: str) -> str:
    with transaction(engine) as s:
        return store.get_job(s, job_id).status


def test_terminal_states_have_no_way_out():
    assert all(lifecycle.NEXT[s] == frozenset() for s in TERMINAL)
    assert set(lifecycle.NEXT) == set(JobStatus)


def test_every_transition_is_allowed_exactly_when_the_table_says(engine):
    pairs = list(itertools.product(JobStatus, JobStatus))
    for i, (start, _to) in enumerate(pairs):
        put(engine, f"j{i}", start)
    with transaction(engine) as ex:
        moved = {(start, to): lifecycle.move(ex, f"j{i}", to, utcnow()) for i, (start, to) in enumerate(pairs)}
    for i, (start, to) in enumerate(pairs):
        allowed = to in lifecycle.NEXT[start]
        assert moved[(start, to)] is allowed, f"{start.value} -> {to.value}"
        assert status_of(engine, f"j{i}") == (to if allowed else start).value


def test_a_move_to_an_end_sets_finished_at_and_stops_polling(engine):
    put(engine, "j", JobStatus.processing)
    with transaction(engine) as ex:
        assert lifecycle.succeed(ex, "j", utcnow(), result_urls=["https://r/0.png"], answer={"status": "success"})
    with transaction(engine) as s:
        row = store.get_job(s, "j")
        assert row.finished_at is not None and row.next_poll_at is None and row.result_urls == ["https://r/0.png"]


def test_a_verb_may_narrow_the_table_but_not_widen_it(engine):
    put(engine, "active", JobStatus.submitted)
    with transaction(engine) as ex:
        # fail_submit fails only a job being submitted, never an active one the table would allow.
        assert not lifecycle.fail_submit(ex, "active", utcnow(), "x", "y")
        with pytest.raises(ValueError, match="cannot follow"):
            lifecycle.move(ex, "active", JobStatus.cancelled, utcnow(), only_from={JobStatus.submitted})
    assert status_of(engine, "active") == "submitted"


@pytest.mark.parametrize("status", list(JobStatus))
def test_a_job_starts_only_as_queued_submitting_or_rejected(engine, status):
    with transaction(engine) as ex:
        if status in lifecycle.CREATED_AS:
            assert lifecycle.create(ex, f"new-{status.value}", status, {"prompt": "x"}, None, utcnow())
            assert not lifecycle.create(ex, f"new-{status.value}", status, {"prompt": "x"}, None, utcnow())
        else:
            with pytest.raises(ValueError, match="cannot start"):
                lifecycle.create(ex, f"new-{status.value}", status, {"prompt": "x"}, None, utcnow())


def test_pending_after_running_keeps_the_job_processing(engine):
    put(engine, "j", JobStatus.processing)
    with transaction(engine) as ex:
        assert lifecycle.observe(ex, "j", utcnow(), running=False, next_poll_at=utcnow())
    assert status_of(engine, "j") == "processing"


def test_a_queued_job_is_taken_once_and_nothing_else_is(engine):
    put(engine, "waiting", JobStatus.queued)
    for status in JobStatus:
        if status is not JobStatus.queued:
            put(engine, status.value, status)
    with transaction(engine) as ex:
        taken = lifecycle.take(ex, "waiting", utcnow())
        assert taken == store.Taken("waiting", 1, {"prompt": "x"}, "default")
        assert lifecycle.take(ex, "waiting", utcnow()) is None
        assert lifecycle.take(ex, "nobody", utcnow()) is None
        for status in JobStatus:
            if status is not JobStatus.queued:
                assert lifecycle.take(ex, status.value, utcnow()) is None, status
    assert status_of(engine, "waiting") == "submitting"
    for status in JobStatus:
        if status is not JobStatus.queued:
            assert status_of(engine, status.value) == status.value


def test_a_refunded_requeue_touches_only_its_own_job(engine):
    for job_id in ("a", "b"):
        put(engine, job_id, JobStatus.queued)
    with transaction(engine) as ex:
        for job_id in ("a", "b"):
            assert lifecycle.take(ex, job_id, utcnow()).attempt == 1
        assert lifecycle.requeue(ex, "a", utcnow(), refund=True, error_code="402", error_message="balance")
    with transaction(engine) as s:
        a, b = store.get_job(s, "a"), store.get_job(s, "b")
        assert (a.status, a.attempts, a.error_code) == ("queued", 0, "402")
        assert (b.status, b.attempts, b.error_code) == ("submitting", 1, None)


def test_a_claim_is_released_only_by_the_thread_that_made_it(engine):
    first = utcnow()
    put(engine, "c", JobStatus.queued)
    with transaction(engine) as ex:
        assert lifecycle.take(ex, "c", first).attempt == 1
        assert not lifecycle.release_claim(ex, "c", first + timedelta(microseconds=1), utcnow())
        assert lifecycle.release_claim(ex, "c", first, utcnow())
        assert not lifecycle.release_claim(ex, "c", first, utcnow())  # released once
        assert lifecycle.take(ex, "c", utcnow()).attempt == 1  # the attempt was refunded
    assert status_of(engine, "c") == "submitting"


def test_a_jobs_end_adds_its_outbox_rows_in_the_same_transaction(engine):
    now = utcnow()
    with transaction(engine) as s:
        s.add(Job(id="hooked", status="processing", request={}, created_at=now, updated_at=now, webhook="https://h/x"))
        s.add(
            Job(
                id="both",
                status="submitting",
                request={},
                created_at=now,
                updated_at=now,
                webhook="https://h/y",
                callback={"task": "done", "queue": "q"},
            )
        )
        s.add(Job(id="plain", status="processing", request={}, created_at=now, updated_at=now))
    with transaction(engine) as ex:
        assert lifecycle.succeed(ex, "hooked", now, result_urls=["https://r/0.png"], answer={})
        assert lifecycle.fail_submit(ex, "both", now, "400", "bad")
        assert lifecycle.succeed(ex, "plain", now, result_urls=["https://r/1.png"], answer={})
        assert not lifecycle.succeed(ex, "plain", now, result_urls=[], answer={})  # ended once: no second row
        assert lifecycle.reject(ex, "invalid", {}, None, now, "bad request")
    with transaction(engine) as s:
        found = {(d.job_id, d.channel): d.state for d in s.scalars(select(Delivery))}
    assert found == {
        ("hooked", "archive"): "pending",
        ("hooked", "webhook"): "waiting",  # the event waits for the images
        ("both", "webhook"): "pending",  # nothing to archive: the event is due at once
        ("both", "callback"): "pending",
        ("plain", "archive"): "pending",
    }


def refuse_outbox_rows(engine) -> None:
    """From now on every insert into the outbox fails in the database itself, as a full disk or a
    broken constraint would: what the transaction wrote before it must go with it."""
    with transaction(engine) as s:
        if engine.dialect.name == "sqlite":
            s.execute(
                text(
                    "CREATE TRIGGER refuse_outbox BEFORE INSERT ON deliveries "
                    "BEGIN SELECT RAISE(ABORT, 'outbox refused'); END"
                )
            )
        else:
            s.execute(
                text(
                    "CREATE FUNCTION refuse_outbox() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'outbox refused'; END $$"
                )
            )
            s.execute(
                text(
                    "CREATE TRIGGER refuse_outbox BEFORE INSERT ON deliveries "
                    "FOR EACH ROW EXECUTE FUNCTION refuse_outbox()"
                )
            )


def test_a_jobs_end_rolls_back_when_its_outbox_rows_cannot_be_written(engine):
    """The end and its rows are one transaction: an end committed before its rows would leave a job
    ended with no event for its caller, and nothing would ever send one."""
    now = utcnow()
    with transaction(engine) as s:
        s.add(Job(id="hooked", status="processing", request={}, created_at=now, updated_at=now, webhook="https://h/x"))
        s.add(Job(id="sent", status="submitting", request={}, created_at=now, updated_at=now, webhook="https://h/y"))
    refuse_outbox_rows(engine)
    with pytest.raises(DBAPIError, match="outbox refused"), atomic(engine) as ex:
        lifecycle.succeed(ex, "hooked", utcnow(), result_urls=["https://r/0.png"], answer={})
    with pytest.raises(DBAPIError, match="outbox refused"), transaction(engine) as s:
        lifecycle.fail_submit(s, "sent", utcnow(), "400", "bad")
    assert status_of(engine, "hooked") == "processing"
    assert status_of(engine, "sent") == "submitting"
    with transaction(engine) as s:
        assert list(s.scalars(select(Delivery))) == []


def test_a_cancelled_job_says_who_cancelled_it_and_when(engine):
    put(engine, "queued", JobStatus.queued)
    with transaction(engine) as ex:
        assert lifecycle.cancel(ex, "queued", utcnow())
        assert lifecycle.cancel_unseen(ex, "unseen", utcnow())
        assert not lifecycle.cancel_unseen(ex, "queued", utcnow())  # it exists: not made again
    with transaction(engine) as s:
        seen, unseen = store.get_job(s, "queued"), store.get_job(s, "unseen")
        assert (seen.status, seen.error_code, seen.error_message) == (
            "cancelled",
            "cancelled",
            "cancelled by an operator",
        )
        assert (unseen.status, unseen.error_code, unseen.error_message) == (
            "cancelled",
            "cancelled",
            "cancelled by an operator before a worker took its message",
        )
