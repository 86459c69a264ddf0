"""Engines and sessions, made per process.

Celery's prefork pool forks after import; a connection pool inherited across a
fork shares sockets between processes and breaks (measured here: 33 tasks/s and
broken connections). Engines are therefore cached by process id, so every
process, forked or not, builds its own on first use.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

_lock = threading.Lock()
_engines: dict[tuple[int, str], Engine] = {}
_makers: dict[tuple[int, str], sessionmaker[Session]] = {}


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


def normalise_url(url: str) -> str:
    # Plain postgresql:// would pick psycopg2, which we do not install.
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def engine(url: str, pool_size: int = 10) -> Engine:
    key = (os.getpid(), url)
    eng = _engines.get(key)
    if eng is not None:
        return eng
    with _lock:
        eng = _engines.get(key)
        if eng is None:
            full = normalise_url(url)
            if full.startswith("sqlite"):
                if full.startswith("sqlite:///") and not full.startswith("sqlite:///:memory:"):
                    os.makedirs(os.path.dirname(full[len("sqlite:///") :]) or ".", exist_ok=True)
                eng = create_engine(full, connect_args={"timeout": 30, "check_same_thread": False})
                _configure_sqlite(eng)
            else:
                # No pre-ping: it costs a round trip per checkout on the hot path.
                # A connection that died with a database restart fails its
                # statement, and the task is retried (worker.tasks, autoretry).
                eng = create_engine(full, pool_size=pool_size, max_overflow=0, pool_recycle=1800)
            _engines[key] = eng
            _makers[key] = sessionmaker(eng, expire_on_commit=False)
        return eng


@contextmanager
def session(url: str, pool_size: int = 10) -> Iterator[Session]:
    """A session in one transaction: committed on success, rolled back on error."""
    engine(url, pool_size)
    with _makers[(os.getpid(), url)].begin() as s:
        yield s


@contextmanager
def connect(url: str, pool_size: int = 10) -> Iterator[Connection]:
    """A Core connection for single-statement work, without ORM bookkeeping.

    On PostgreSQL it runs in autocommit: each statement is its own transaction,
    saving the BEGIN and COMMIT round trips; every write in models.store is
    one conditional statement, atomic on its own. SQLite keeps a transaction
    (its write lock is taken at BEGIN, see _configure_sqlite).
    """
    eng = engine(url, pool_size)
    if eng.dialect.name == "sqlite":
        with eng.begin() as conn:
            yield conn
    else:
        with eng.connect() as conn:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")


def dispose_all() -> None:
    """Drop this process's engines (after fork, or at shutdown)."""
    with _lock:
        for key in [k for k in _engines if k[0] == os.getpid()]:
            _engines.pop(key).dispose()
            _makers.pop(key)
