"""A job's end outside a transaction, refused by PostgreSQL; and tests/unit/test_lifecycle.py's database tests
again, on PostgreSQL."""

from __future__ import annotations

import pytest

from models import JobStatus, lifecycle
from models.db import make_engine, statement
from models.job import utcnow
from tests.unit.test_lifecycle import *  # noqa: F403
from tests.unit.test_lifecycle import put


@pytest.mark.services
def test_a_jobs_end_outside_a_transaction_is_refused_on_postgresql(pg_url):
    eng = make_engine(pg_url)
    put(eng, "j", JobStatus.processing)
    with statement(eng) as ex, pytest.raises(ValueError, match="in a transaction"):
        lifecycle.succeed(ex, "j", utcnow(), result_urls=["https://r/0.png"], answer={})
    eng.dispose()
