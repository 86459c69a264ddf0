"""Fixtures for real components: PostgreSQL, RabbitMQ, Redis, the sandbox, worker processes.

A service that is down is a skip with its reason on a laptop, and a failure
under CI (any true value), where every service is required (tests/services.py).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from models.migrate import upgrade
from tests.services import require
from worker import resources

PG_ADMIN_URL = os.environ.get("KLING_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
RABBIT_URL = os.environ.get("KLING_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("KLING_TEST_REDIS", "redis://127.0.0.1:6379/0")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database, migrated, dropped afterwards."""
    require("127.0.0.1", 5432, "PostgreSQL")
    name = f"kling_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    upgrade(url)
    yield url
    resources.reset()  # its connections to the database about to be dropped
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def any_db_url(request) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture
def rabbit_url() -> str:
    require("127.0.0.1", 5672, "RabbitMQ")
    return RABBIT_URL


@pytest.fixture
def redis_url() -> str:
    require("127.0.0.1", 6379, "Redis")
    return REDIS_URL


@pytest.fixture
def sandbox():
    from worker.dev.sandbox import SandboxServer

    with SandboxServer(api_key="test-key-" + uuid.uuid4().hex, task_seconds=0.5) as server:
        yield server


@pytest.fixture
def configure(monkeypatch):
    """Point this process's runtime at the given settings (env vars), fresh each time."""

    def apply(**env: str) -> None:
        for key, value in env.items():
            monkeypatch.setenv(key, str(value))
        resources.reset()

    yield apply
    resources.reset()


@pytest.fixture
def service(any_db_url, sandbox, configure):
    """This process configured as a worker against the sandbox, on SQLite and on PostgreSQL."""
    configure(
        DATABASE_URL=any_db_url,
        MODELLIX_BASE_URL=sandbox.url,
        MODELLIX_API_KEY=sandbox.api_key,
        KLING_MAX_ATTEMPTS=3,
        KLING_BACKOFF_BASE=0.1,
        KLING_ACCOUNT_RETRY=30,
        KLING_POLL_DEADLINE=60,
    )
    return sandbox


# -- an S3-compatible store: moto's standalone server, in this process ---------------


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    """moto's standalone S3 server in this process, on a free port: real HTTP, real boto3 calls."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch, tmp_path, moto_url) -> dict[str, str]:
    """The standard AWS environment boto3 reads, pointing at moto; no file on this machine is read."""
    env = {
        "AWS_ENDPOINT_URL": moto_url,
        "AWS_ACCESS_KEY_ID": "AKIAKLINGTEST" + uuid.uuid4().hex[:7].upper(),
        "AWS_SECRET_ACCESS_KEY": "kling-test-secret-" + uuid.uuid4().hex,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    return env


@pytest.fixture
def bucket(aws_env) -> str:
    import boto3

    name = "kling-" + uuid.uuid4().hex[:12]
    boto3.session.Session().client("s3").create_bucket(Bucket=name)
    return name
