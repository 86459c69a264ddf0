"""What a database outage must not lose: the learning counts a failed merge keeps for the next one
(learning._Counts.add). A claim that may have committed unseen: tests/unit/test_submission.py.

A table gone from under the code (tests/support/tables.py) for the outage in the middle of a real merge.
"""

from __future__ import annotations

import logging
import math

import pytest
from sqlalchemy import select

from models import PollShape
from tests.support.tables import table_away
from worker import resources
from worker.polling import learning, schedule
from worker.polling.learning import _Counts

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
