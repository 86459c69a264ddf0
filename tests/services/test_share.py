"""tests/unit/test_share.py's database tests again, on PostgreSQL; and several claimers racing for one line."""

from __future__ import annotations

import threading

import pytest

from models import tenants
from models.db import make_engine, transaction
from models.job import utcnow
from tests.unit.test_share import *  # noqa: F403
from tests.unit.test_share import queue, take


def race(engine, claimers: int) -> list[str]:
    """`claimers` threads start at once and each takes jobs until the line gives none; every job taken."""
    taken: list[list[str]] = [[] for _ in range(claimers)]
    start = threading.Barrier(claimers)

    def claim(mine: list[str]) -> None:
        start.wait()
        while (job_id := take(engine)) is not None:
            mine.append(job_id)

    threads = [threading.Thread(target=claim, args=(mine,)) for mine in taken]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return [job_id for mine in taken for job_id in mine]


@pytest.mark.services
def test_claims_racing_on_postgresql_take_each_job_once(any_db_url):
    engine = make_engine(any_db_url)
    for i in range(40):
        queue(engine, f"j{i:02}", "ab"[i % 2], ago=100 - i)
    assert sorted(race(engine, 4)) == [f"j{i:02}" for i in range(40)]
    engine.dispose()


@pytest.mark.services
def test_a_tenants_cap_holds_when_claims_race_on_postgresql(any_db_url):
    engine = make_engine(any_db_url)
    with transaction(engine) as s:
        tenants.set_policy(s, "capped", utcnow(), max_in_flight=3)
    for i in range(20):
        queue(engine, f"c{i:02}", "capped", ago=100 - i)
    assert sorted(race(engine, 6)) == ["c00", "c01", "c02"]  # three places, taken in line order, whoever raced
    engine.dispose()
