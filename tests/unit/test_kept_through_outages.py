"""What a database outage must not lose: a claim that may have committed unseen (submission.ClaimUnknown),
and the learning counts a failed merge keeps for the next one (learning._Counts.add).

Real exceptions from SQLite and SQLAlchemy, and a table gone from under the code (tests/support/tables.py)
for the outage in the middle of a real submit or merge.
"""

from __future__ import annotations

import logging
import math

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy import exc as sa_exc

from models import PollShape
from models.job import utcnow
from tests.support.jobs import handle, job
from tests.support.tables import table_away
from worker import resources, submission
from worker.facts import Claimed
from worker.polling import learning, schedule
from worker.polling.learning import _Counts
from worker.submission import ClaimUnknown


def unreachable_database(tmp_path) -> sa_exc.OperationalError:
    """What SQLAlchemy raises when the database cannot be opened."""
    engine = create_engine(f"sqlite:///{tmp_path / 'no such folder' / 'jobs.sqlite'}")
    try:
        with pytest.raises(sa_exc.OperationalError) as caught:
            engine.connect()
    finally:
        engine.dispose()
    return caught.value


def broken_statement(tmp_path) -> sa_exc.IntegrityError:
    """What SQLAlchemy raises for a statement the database refuses: a bug, not an outage."""
    engine = create_engine(f"sqlite:///{tmp_path / 'other.sqlite'}")
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
            conn.execute(text("INSERT INTO t VALUES (1)"))
        with pytest.raises(sa_exc.IntegrityError) as caught, engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (1)"))
    finally:
        engine.dispose()
    return caught.value


# -- a claim not seen to commit -------------------------------------------------------------


def test_an_outage_during_a_claim_is_a_claim_unknown_with_its_cause_and_time(tmp_path):
    cause = unreachable_database(tmp_path)
    at = utcnow()
    unknown = ClaimUnknown.after(cause, at)
    assert isinstance(unknown, ClaimUnknown)
    assert unknown.cause is cause and unknown.claimed_at is at
    assert str(unknown) == str(cause) and unknown.args == (str(cause),)
    assert "unable to open database file" in str(unknown)


def test_anything_else_during_a_claim_is_raised_as_it_is(tmp_path):
    at = utcnow()
    for error in (broken_statement(tmp_path), ValueError("a bug"), sa_exc.ProgrammingError("SELECT", {}, None)):
        assert ClaimUnknown.after(error, at) is error


def test_a_submit_whose_claim_met_an_outage_carries_the_claim_on_in_its_message(service):
    start = utcnow()
    with table_away("jobs"):
        out = handle(job_id="unseen", request={"prompt": "x"})
    end = utcnow()
    assert out.job_id == "unseen" and out.status is None
    step = out.next_step
    assert isinstance(step, submission.HandOn) and step.after > 0
    fact = step.fact
    assert isinstance(fact, Claimed) and fact.job_id == "unseen" and start <= fact.at <= end
    assert job("unseen") is None and service.stats()["submits"] == 0  # nothing claimed, nothing sent


# -- counts a failed merge keeps ---------------------------------------------------------------


def test_counts_add_up_and_keep_the_last_learned_first_poll_used():
    kept = _Counts(hits=1, misses=2, seeded=3, seed_sum=0.5, used=1.5)
    kept.add(_Counts(hits=10, misses=20, seeded=30, seed_sum=5.0, used=2.5))
    assert kept == _Counts(hits=11, misses=22, seeded=33, seed_sum=5.5, used=2.5)
    kept.add(_Counts(hits=1))  # no learned first poll used since: the last one stays
    assert kept == _Counts(hits=12, misses=22, seeded=33, seed_sum=5.5, used=2.5)


def test_what_a_failed_merge_counted_reaches_the_table_with_the_next(service, caplog):
    learner = resources.get().learner
    request = {"prompt": "x"}  # one shape: ("1k", 1, 0)
    learner.first_poll("one", request)
    learner.first_poll("two", request)
    learner.answered("one", 1, 3.0, True)  # ended 3 s after its submit
    with table_away("poll_shapes"):
        learner.sync()
    failed = [r for r in caplog.records if getattr(r, "event", None) == "poll_learning_failed"]
    assert [r.levelno for r in failed] == [logging.WARNING]  # once, then quiet while it lasts
    learner.answered("two", 1, 5.0, True)
    learner.sync()
    with resources.get().transaction() as s:
        (row,) = s.scalars(select(PollShape)).all()
    assert (row.resolution, row.n, row.images, row.seeded) == ("1k", 1, 0, 2)
    assert math.isclose(row.log_first, (schedule.seed(0.0, 3.0) + schedule.seed(0.0, 5.0)) / 2)
    assert learning.first_poll(resources.get(), "three", request).delay == pytest.approx(
        schedule.bounded(math.exp(row.log_first), resources.get().settings)
    )
