"""A table taken from under the running code: the one database fault a unit test can aim at one statement.

SQLite reports a missing table with an OperationalError, which models.db.unreachable counts as an
outage (as it does a lock that timed out), so the code in the block sees the database as away for the
statements on that table and only those. SQLite only: PostgreSQL raises ProgrammingError for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from worker import resources


@contextmanager
def table_away(name: str) -> Iterator[None]:
    """The table is gone until the block ends (renamed, with its rows, and put back)."""
    engine = resources.get().engine
    assert engine.dialect.name == "sqlite", "a missing table is an outage on SQLite only"
    with engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE {name} RENAME TO {name}_away")
    try:
        yield
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"ALTER TABLE {name}_away RENAME TO {name}")
