"""The job table's claims and queries, on SQLite here and on PostgreSQL in tests/services/test_store.py
(SKIP LOCKED there)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from models import JobStatus, store
from models.db import make_engine, statement, transaction
from models.job import Job, utcnow


@pytest.fixture
def engine(any_db_url):
    eng = make_engine(any_db_url)
    yield eng
    eng.dispose()


def put(engine, job_id: str, status: JobStatus, *, due_in: float | None = None, age: float = 0.0) -> None:
    now = utcnow()
    when = now - timedelta(seconds=age)
    due = now + timedelta(seconds=due_in) if due_in is not None else None
    with transaction(engine) as s:
        s.add(
            Job(
                id=job_id,
                status=status.value,
                request={},
                next_poll_at=due,
                created_at=when,
                updated_at=when,
                modellix_task_id=f"task-{job_id}" if status in (JobStatus.submitted, JobStatus.processing) else None,
                submitted_at=when,
            )
        )


def test_a_claimed_poll_is_leased_so_the_sweep_leaves_it(engine):
    put(engine, "p", JobStatus.submitted, due_in=-1)
    now = utcnow()
    with statement(engine) as ex:
        claimed = store.claim_poll(ex, "p", 0, now, lease=45)
        assert claimed is not None and claimed[0] == "task-p"
        assert store.claim_poll(ex, "p", 0, now, lease=45) is None  # the token moved on
    with transaction(engine) as s:
        assert store.claim_overdue_polls(s, now + timedelta(seconds=40), 45, 10) == []
        assert store.claim_overdue_polls(s, now + timedelta(seconds=50), 45, 10) == [("p", 1)]


def test_the_sweep_takes_only_active_overdue_jobs_oldest_first_and_at_most_its_batch(engine):
    put(engine, "later", JobStatus.submitted, due_in=-5)
    put(engine, "first", JobStatus.processing, due_in=-50)
    put(engine, "second", JobStatus.submitted, due_in=-20)
    put(engine, "not-due", JobStatus.submitted, due_in=30)
    put(engine, "ended", JobStatus.succeeded, due_in=-100)
    now = utcnow()
    with transaction(engine) as s:
        assert store.claim_overdue_polls(s, now, 60, 2) == [("first", 0), ("second", 0)]
    with transaction(engine) as s:  # leased 60 s ahead: not taken again
        assert store.claim_overdue_polls(s, now, 60, 10) == [("later", 0)]


def test_stale_claims_take_only_that_status_older_than_the_bound(engine):
    put(engine, "old", JobStatus.submitting, age=100)
    put(engine, "older", JobStatus.submitting, age=200)
    put(engine, "young", JobStatus.submitting, age=10)
    put(engine, "other", JobStatus.queued, age=500)
    with transaction(engine) as s:
        assert sorted(store.claim_stale(s, JobStatus.submitting, utcnow() - timedelta(seconds=50), 10)) == [
            "old",
            "older",
        ]
        assert len(store.claim_stale(s, JobStatus.submitting, utcnow() - timedelta(seconds=50), 1)) == 1


def test_a_poll_due_now_is_overdue_and_its_lease_is_written(engine):
    put(engine, "p", JobStatus.submitted)
    now = utcnow()
    with transaction(engine) as s:
        s.get(Job, "p").next_poll_at = now
    with transaction(engine) as s:
        assert store.claim_overdue_polls(s, now, 45, 10) == [("p", 0)]
    with transaction(engine) as s:
        assert s.get(Job, "p").next_poll_at == now + timedelta(seconds=45)


def test_a_claim_last_changed_at_the_bound_itself_is_not_stale(engine):
    put(engine, "s", JobStatus.submitting)
    with transaction(engine) as s:
        changed = s.get(Job, "s").updated_at
    with transaction(engine) as s:
        assert store.claim_stale(s, JobStatus.submitting, changed, 10) == []
        assert store.claim_stale(s, JobStatus.submitting, changed + timedelta(microseconds=1), 10) == ["s"]


def test_a_list_holds_fifty_jobs_unless_asked_for_more(engine):
    for i in range(51):
        put(engine, f"j{i:02}", JobStatus.queued, age=i)
    with transaction(engine) as s:
        listed = store.list_jobs(s)
        assert [j.id for j in listed] == [f"j{i:02}" for i in range(50)]  # the newest first
        assert len(store.list_jobs(s, limit=51)) == 51
