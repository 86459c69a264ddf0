"""Engines and URLs."""

from __future__ import annotations

import threading

from models.db import make_engine, normalise_url, statement


def test_postgresql_urls_use_psycopg_3_and_others_are_left_alone():
    assert normalise_url("postgresql://u:p@h:5432/db") == "postgresql+psycopg://u:p@h:5432/db"
    assert normalise_url("postgres://u@h/db?x=a://b") == "postgresql+psycopg://u@h/db?x=a://b"
    assert normalise_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalise_url("sqlite:///x.sqlite") == "sqlite:///x.sqlite"


def test_an_sqlite_file_in_a_new_folder_is_shared_by_threads(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'new' / 'jobs.sqlite'}")
    try:
        with statement(engine) as ex:
            ex.exec_driver_sql("create table t (x int)")
        errors: list[Exception] = []

        def write(i: int) -> None:
            try:
                with statement(engine) as ex:
                    ex.exec_driver_sql(f"insert into t values ({i})")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        with statement(engine) as ex:
            assert ex.exec_driver_sql("select count(*) from t").scalar_one() == 8
            assert ex.exec_driver_sql("pragma journal_mode").scalar_one() == "wal"
    finally:
        engine.dispose()


def test_times_are_utc_aware_on_sqlite_and_naive_ones_are_refused(tmp_path):
    from datetime import datetime, timedelta, timezone

    import pytest

    from models.db import transaction
    from models.job import Base, Job

    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    try:
        Base.metadata.create_all(engine)
        paris = datetime(2026, 6, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
        with transaction(engine) as s:
            s.add(Job(id="j", status="queued", request={}, created_at=paris, updated_at=paris))
        with transaction(engine) as s:
            stored = s.get(Job, "j").created_at
        assert stored == paris and stored.utcoffset() == timedelta(0)  # the same instant, in UTC
        with pytest.raises(Exception, match="naive datetime"), transaction(engine) as s:
            s.add(Job(id="k", status="queued", request={}, created_at=datetime(2026, 6, 1), updated_at=paris))
    finally:
        engine.dispose()
