"""The servers the tests use and what happens when one is missing: a failure under CI, where
everything is required, and a skip naming what is missing elsewhere.

Under pytest-xdist each worker process (gw0, gw1, ...) gets its own share of every server, so
tests that run at the same time never see each other's state: a PostgreSQL database per test
(as without xdist), a RabbitMQ virtual host and a Redis database number per worker.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
import requests
from sqlalchemy import create_engine, text

from models.migrate import upgrade

PG_ADMIN_URL = os.environ.get("KLING_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
RABBIT_URL = os.environ.get("KLING_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("KLING_TEST_REDIS", "redis://127.0.0.1:6379/0")
RABBIT_MANAGEMENT = os.environ.get("KLING_TEST_RABBIT_MANAGEMENT", "http://guest:guest@127.0.0.1:15672")


def in_ci() -> bool:
    """CI sets CI to a true value (true, 1, yes, on): there every service is required."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def missing(what: str) -> None:
    """A required service is absent: a failure in CI, a skip naming it elsewhere."""
    if in_ci():
        pytest.fail(f"required in CI but missing: {what}", pytrace=False)
    pytest.skip(f"missing: {what}")


def require(host: str, port: int, name: str) -> None:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        missing(f"{name} is not reachable on {host}:{port} ({exc})")


def xdist_worker() -> str | None:
    """This process's pytest-xdist worker id (gw0, gw1, ...); None when pytest runs alone."""
    return os.environ.get("PYTEST_XDIST_WORKER")


# -- PostgreSQL: a database per test, whoever runs beside it ----------------------------------


def create_database(prefix: str = "kling_test") -> str:
    """A fresh, migrated database; its URL. Unique names, so parallel tests and runs never meet."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    upgrade(url)
    return url


def drop_database(url: str) -> None:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()


# -- RabbitMQ: a virtual host per xdist worker ------------------------------------------------
#
# Queue names are random already; the virtual host also keeps apart what is not named by a test:
# Celery's broadcasts (a monitor's enable_events reaches every worker of a virtual host, see
# tests/e2e/test_flower.py) and queues with fixed names such as a callback's.


def rabbit_vhost_url(worker: str) -> tuple[str, str | None]:
    """RABBIT_URL moved to a fresh virtual host for this xdist worker, and the host's name to delete
    at the end; RABBIT_URL itself (and None) when no virtual host can be made here (no management
    API and no rabbitmqctl we may run): the random queue names still keep most apart."""
    parts = urlsplit(RABBIT_URL)
    # The test run's id as well as the worker's: another run on this machine has a gw0 too.
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID", uuid.uuid4().hex)[:8]
    vhost = f"kling-test-{run}-{worker}"
    if _vhost_by_api(vhost) or _vhost_by_rabbitmqctl(vhost):
        return urlunsplit((parts.scheme, parts.netloc, "/" + quote(vhost, safe=""), "", "")), vhost
    return RABBIT_URL, None


def delete_rabbit_vhost(vhost: str) -> None:
    try:
        if requests.delete(f"{RABBIT_MANAGEMENT}/api/vhosts/{quote(vhost, safe='')}", timeout=10).ok:
            return
    except requests.RequestException:
        pass  # no management API here: rabbitmqctl made it
    if shutil.which("rabbitmqctl"):
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True, timeout=60)


def _vhost_by_api(vhost: str) -> bool:
    url = f"{RABBIT_MANAGEMENT}/api"
    name = quote(vhost, safe="")
    try:
        made = requests.put(f"{url}/vhosts/{name}", timeout=10)
        user = requests.get(f"{url}/whoami", timeout=10).json()["name"]
        allowed = requests.put(
            f"{url}/permissions/{name}/{quote(user, safe='')}",
            json={"configure": ".*", "write": ".*", "read": ".*"},
            timeout=10,
        )
    except (requests.RequestException, ValueError, KeyError):
        return False
    return made.ok and allowed.ok


def _vhost_by_rabbitmqctl(vhost: str) -> bool:
    if not shutil.which("rabbitmqctl"):
        return False
    user = RABBIT_URL.split("://", 1)[1].split(":", 1)[0].split("@", 1)[0] or "guest"
    for args in (["add_vhost", vhost], ["set_permissions", "-p", vhost, user, ".*", ".*", ".*"]):
        try:
            done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return False
        if done.returncode != 0:
            return False
    return True


# -- Redis: a database number per xdist worker -------------------------------------------------


def redis_db_url(worker: str) -> str:
    """REDIS_URL on database 1 + the worker's number (gw0 on 1, gw1 on 2, ...; 16 by default)."""
    base, _, _ = REDIS_URL.rpartition("/")
    number = int(worker.removeprefix("gw")) if worker.startswith("gw") else 0
    return f"{base}/{1 + number % 15}"
