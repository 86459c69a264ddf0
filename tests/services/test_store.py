"""Two sweepers on PostgreSQL never take the same rows; and tests/unit/test_store.py's database tests again, on
PostgreSQL."""

from __future__ import annotations

import threading

import pytest

from models import JobStatus, store
from models.db import make_engine, transaction
from models.job import utcnow
from tests.unit.test_store import *  # noqa: F403
from tests.unit.test_store import put


@pytest.mark.services
def test_two_sweepers_never_take_the_same_rows(pg_url):
    engine = make_engine(pg_url)
    try:
        for i in range(4):
            put(engine, f"j{i}", JobStatus.submitted, due_in=-60 + i)
        first_took = threading.Event()
        release = threading.Event()
        taken: dict[str, list[tuple[str, int]]] = {}

        def sweeper_a() -> None:
            with transaction(engine) as s:
                taken["a"] = store.claim_overdue_polls(s, utcnow(), 60, 2)
                first_took.set()
                release.wait(10)  # holds its row locks until the other sweeper has run

        a = threading.Thread(target=sweeper_a)
        a.start()
        assert first_took.wait(10)
        with transaction(engine) as s:  # would block on a's locks without SKIP LOCKED
            taken["b"] = store.claim_overdue_polls(s, utcnow(), 60, 10)
        release.set()
        a.join(10)
        assert [j for j, _ in taken["a"]] == ["j0", "j1"] and [j for j, _ in taken["b"]] == ["j2", "j3"]
    finally:
        engine.dispose()
