"""Database engines, and the three ways to use one: `transaction` (an ORM session in one transaction),
`atomic` (Core statements in one transaction) and `statement` (one statement, atomic on its own).

An engine is made by whoever owns the process's resources (worker.resources),
after any fork: a connection pool inherited across a fork shares sockets
between processes and breaks (measured here: 33 tasks/s and broken connections).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

# What the query functions in models/ accept: a single statement's connection or a transaction's session.
Executor = Connection | Session


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        # WAL lets readers run beside the one writer; busy_timeout makes
        # concurrent writers from several worker processes wait instead of failing.
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()
        # pysqlite's own transaction handling defers BEGIN; take the write lock
        # at BEGIN so read-then-write claims cannot deadlock.
        dbapi_conn.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn):  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def unreachable(exc: BaseException) -> bool:
    """The database could not be reached, dropped the connection or is too busy: an outage, not a bug.

    The DB-API's OperationalError is what both psycopg and sqlite3 raise for a
    refused or lost connection, an administrator's shutdown, or a lock that
    timed out; a wrong statement raises ProgrammingError or IntegrityError instead.
    """
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    # TimeoutError: every pooled connection is taken, and none came back in time.
    return isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError))


def normalise_url(url: str) -> str:
    # Plain postgresql:// would pick psycopg2, which we do not install.
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def sqlite_file(url: str) -> Path | None:
    """The file an SQLite URL names; None for any other database (or an in-memory one)."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        return Path(url.removeprefix("sqlite:///"))
    return None


def make_engine(url: str, pool_size: int = 10) -> Engine:
    full = normalise_url(url)
    if full.startswith("sqlite"):
        path = sqlite_file(full)
        if path is not None:
            os.makedirs(path.parent, exist_ok=True)
        engine = create_engine(full, connect_args={"timeout": 30, "check_same_thread": False})
        _configure_sqlite(engine)
        return engine
    # No pre-ping: it costs a round trip per checkout on the hot path. A
    # connection that died with a database restart fails its statement, and
    # the task is retried (worker.wiring.tasks).
    return create_engine(full, pool_size=pool_size, max_overflow=0, pool_recycle=1800)


@contextmanager
def transaction(engine: Engine) -> Iterator[Session]:
    """A session in one transaction, committed on success and rolled back on error.

    For work that must hold a row lock until it commits, or read and write together.
    """
    with Session(engine, expire_on_commit=False) as s, s.begin():
        yield s


@contextmanager
def atomic(engine: Engine) -> Iterator[Connection]:
    """Several Core statements in one transaction, committed on success and rolled back on error.

    A transaction without the ORM's session, whose bookkeeping costs more CPU than the
    statements themselves on the hot paths (a job's end, an archive settled), where no
    ORM object is read.
    """
    with engine.begin() as conn:
        yield conn


@contextmanager
def statement(engine: Engine) -> Iterator[Connection]:
    """A connection for one statement that is atomic on its own (every write in models.store is).

    On PostgreSQL it runs in autocommit, saving the BEGIN and COMMIT round
    trips. SQLite keeps a transaction, because its write lock is taken at
    BEGIN (see _configure_sqlite).
    """
    if engine.dialect.name == "sqlite":
        with engine.begin() as conn:
            yield conn
    else:
        with engine.connect() as conn:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")
