"""Alembic environment: the URL comes from the Alembic config or DATABASE_URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from models.db import make_engine, normalise_url
from models.job import Base

config = context.config


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        from worker.config import load

        url = load().database_url
    return normalise_url(url)


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    url = _url()
    # SQLite gets the project's own engine (WAL, busy timeout); a server needs no pool for one migration.
    connectable = make_engine(url) if url.startswith("sqlite") else create_engine(url, poolclass=pool.NullPool)
    try:
        with connectable.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=Base.metadata,
                render_as_batch=connection.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        connectable.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
