"""Which database errors are an outage (models.db.unreachable), and work put off by one
(worker.resources.Resources.put_off): counted and logged as the outage, anything else raised again.
A real PostgreSQL outage: tests/services/test_outages.py."""

from __future__ import annotations

import logging
import sqlite3
import time

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy import exc as sa_exc

from models import db
from worker import resources
from worker.ops import outages


def driver_error(kind: type[sa_exc.DBAPIError], message: str, invalidated: bool = False) -> sa_exc.DBAPIError:
    return kind("UPDATE jobs SET status = ?", {}, sqlite3.Error(message), connection_invalidated=invalidated)


@pytest.mark.parametrize(
    "exc, outage",
    [
        pytest.param(driver_error(sa_exc.OperationalError, "database is locked"), True, id="operational"),
        pytest.param(driver_error(sa_exc.InterfaceError, "connection already closed"), True, id="interface"),
        pytest.param(sa_exc.TimeoutError("QueuePool limit of size 4 overflow 0 reached"), True, id="pool-timeout"),
        pytest.param(driver_error(sa_exc.ProgrammingError, "server closed", invalidated=True), True, id="invalidated"),
        pytest.param(driver_error(sa_exc.DBAPIError, "connection reset", invalidated=True), True, id="any-invalidated"),
        pytest.param(driver_error(sa_exc.ProgrammingError, "no such column: x"), False, id="programming"),
        pytest.param(driver_error(sa_exc.IntegrityError, "UNIQUE constraint failed"), False, id="integrity"),
        pytest.param(driver_error(sa_exc.DBAPIError, "what"), False, id="other-driver-error"),
        pytest.param(sa_exc.NoResultFound("none"), False, id="not-a-driver-error"),
        pytest.param(ConnectionRefusedError(111, "Connection refused"), False, id="not-sqlalchemy"),
        pytest.param(ValueError("a bug"), False, id="a-bug"),
    ],
)
def test_an_outage_is_a_lost_or_refused_connection_or_a_busy_database(exc, outage):
    assert db.unreachable(exc) is outage


def test_real_errors_from_sqlite(tmp_path):
    missing = create_engine(f"sqlite:///{tmp_path / 'no-such-folder' / 'jobs.sqlite'}")
    with pytest.raises(sa_exc.OperationalError) as cannot_open:
        missing.connect()
    assert db.unreachable(cannot_open.value) is True

    engine = create_engine("sqlite://")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
        conn.execute(text("INSERT INTO t VALUES (1)"))
        with pytest.raises(sa_exc.IntegrityError) as twice:
            conn.execute(text("INSERT INTO t VALUES (1)"))
        with pytest.raises(sa_exc.OperationalError) as wrong:  # sqlite3 says OperationalError for this too
            conn.execute(text("SELECT nope FROM t"))
    assert db.unreachable(twice.value) is False
    assert db.unreachable(wrong.value) is True


# -- work put off -------------------------------------------------------------------------


@pytest.fixture
def res(configure):
    configure()
    return resources.get()


def outage_lines(caplog) -> list[tuple[int, str, str]]:
    return [(r.levelno, r.event, r.getMessage()) for r in caplog.records if r.name == "kling_worker.outages"]


def test_work_put_off_by_an_outage_is_counted_in_the_outage(res, caplog):
    with caplog.at_level(logging.WARNING, logger="kling_worker.outages"):
        res.put_off(driver_error(sa_exc.OperationalError, "database is locked"), "poll")
        assert res.outage.down
        res.put_off(driver_error(sa_exc.OperationalError, "database is locked"), "poll")
        res.put_off(sa_exc.TimeoutError("QueuePool limit reached"), "message")
        res.outage.ok(time.monotonic())
    assert not res.outage.down
    assert outage_lines(caplog) == [
        (
            logging.WARNING,
            "outage_started",
            f"database unreachable (Error: database is locked); meanwhile {outages.database().meanwhile}",
        ),
        (
            logging.WARNING,
            "outage_ended",
            "database reachable again after 0s; put off meanwhile: 1 message, 2 poll; "
            "answers from Modellix held in memory now: 0",
        ),
    ]


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(ValueError("a bug"), id="a-bug"),
        pytest.param(driver_error(sa_exc.IntegrityError, "UNIQUE constraint failed"), id="integrity"),
        pytest.param(driver_error(sa_exc.ProgrammingError, "no such column: x"), id="programming"),
    ],
)
def test_anything_else_is_raised_again_and_is_no_outage(res, caplog, exc):
    with caplog.at_level(logging.WARNING, logger="kling_worker.outages"):
        with pytest.raises(type(exc)) as raised:
            res.put_off(exc, "poll")
    assert raised.value is exc
    assert not res.outage.down and outage_lines(caplog) == []
