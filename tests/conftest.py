"""Fixtures for real components: PostgreSQL, RabbitMQ, Redis, the sandbox, worker processes.

A service that is down is a skip with its reason on a laptop, and a failure
under CI (any true value), where every service is required (tests/support/services.py).

The folder says what a test needs and marks it: tests/unit nothing (unmarked), tests/services
a server (`services`), tests/e2e real worker processes (`slow`). Marks written on a test stay.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from models.migrate import upgrade
from tests.support import services
from tests.support.cli import cli_env
from tests.support.services import require
from worker import resources

HERE = Path(__file__).parent
FOLDER_MARKS = {"services": ("services",), "e2e": ("slow",)}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        folder = item.path.relative_to(HERE).parts[0] if item.path.is_relative_to(HERE) else ""
        for name in FOLDER_MARKS.get(folder, ()):
            if item.get_closest_marker(name) is None:
                item.add_marker(name)


@pytest.fixture(autouse=True)
def _kling_home(monkeypatch, tmp_path) -> None:
    """KLING_HOME (the embedded broker's folders, the default archive) in the test's own folder: unset,
    it is ./.kling in the checkout, which tests running at the same time would share."""
    monkeypatch.setenv("KLING_HOME", str(tmp_path / "kling-home"))


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database, migrated, dropped afterwards."""
    require("127.0.0.1", 5432, "PostgreSQL")
    url = services.create_database()
    yield url
    resources.reset()  # its connections to the database about to be dropped
    services.drop_database(url)


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    upgrade(url)
    return url


@pytest.fixture
def any_db_url(sqlite_url) -> str:
    """The database of tests that run on either: SQLite here; tests/services/conftest.py makes it
    PostgreSQL, where the database tests of tests/unit run again."""
    return sqlite_url


@pytest.fixture(scope="session")
def _rabbit_url() -> Iterator[str]:
    worker = services.xdist_worker()
    if worker is None:
        yield services.RABBIT_URL
        return
    url, vhost = services.rabbit_vhost_url(worker)
    yield url
    if vhost is not None:
        services.delete_rabbit_vhost(vhost)


@pytest.fixture
def rabbit_url(request) -> str:
    require("127.0.0.1", 5672, "RabbitMQ")
    return request.getfixturevalue("_rabbit_url")


@pytest.fixture
def redis_url() -> str:
    require("127.0.0.1", 6379, "Redis")
    worker = services.xdist_worker()
    return services.REDIS_URL if worker is None else services.redis_db_url(worker)


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
def embedded(sqlite_url, configure, tmp_path) -> dict[str, str]:
    """A migrated SQLite job table and the embedded broker; the CLI's environment for them."""
    configure(DATABASE_URL=sqlite_url)
    return cli_env(DATABASE_URL=sqlite_url, KLING_HOME=str(tmp_path / "home"))


@pytest.fixture
def service(any_db_url, sandbox, configure):
    """This process configured as a worker against the sandbox, on `any_db_url` (SQLite in tests/unit,
    PostgreSQL in tests/services)."""
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
