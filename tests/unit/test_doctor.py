"""`kling-worker doctor`: each broken part shows its FAIL line. A healthy setup on real servers:
tests/services/test_doctor.py."""

from __future__ import annotations

import socket
import time
import uuid

import pytest

from tests.support.cli import run_doctor
from tests.support.jobs import set_budget
from worker.cli import doctor
from worker.modellix import ModellixClient


def line(text: str, name: str) -> str:
    matches = [row for row in text.splitlines() if row.split()[1:2] == [name]]
    assert len(matches) == 1, text
    return matches[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def local(sqlite_url, sandbox, configure, tmp_path):
    """Embedded broker and a migrated SQLite database, against the sandbox with the right key."""

    def apply(**env: str) -> None:
        settings = {
            "KLING_HOME": str(tmp_path / "home"),
            "CELERY_BROKER_URL": "filesystem://localhost/",
            "DATABASE_URL": sqlite_url,
            "MODELLIX_BASE_URL": sandbox.url,
            "MODELLIX_API_KEY": sandbox.api_key,
            "MODELLIX_CONNECT_TIMEOUT": "2",
            "MODELLIX_READ_TIMEOUT": "5",
        }
        configure(**{**settings, **env})

    apply()
    return apply


def test_client_account_calls(sandbox):
    client = ModellixClient(sandbox.url, sandbox.api_key)
    assert client.validate_key() is True
    assert client.balance() == 100.0
    sandbox.balance = -3
    assert client.balance() == -3.0
    assert ModellixClient(sandbox.url, "wrong").validate_key() is False


def test_embedded_setup_is_ok_without_a_consumer_count(local, capsys):
    code, text, checks = run_doctor(capsys)
    assert code == 0, text
    assert checks["consumers"] == (True, "consumers: unknown for this transport")
    assert checks["broker"][0] and "embedded filesystem broker" in checks["broker"][1]


def test_wrong_key(local, sandbox, capsys):
    wrong = "wrong-key-" + uuid.uuid4().hex
    local(MODELLIX_API_KEY=wrong)
    code, text, checks = run_doctor(capsys)
    assert code == 1
    assert line(text, "key").startswith("FAIL")
    assert checks["key"] == (False, "key invalid: the API does not take it")
    assert checks["balance"] == (False, "not checked: no valid key")
    assert checks["api"][0]
    assert wrong not in text and sandbox.api_key not in text


def test_missing_key(local, capsys):
    local(MODELLIX_API_KEY="")
    code, _, checks = run_doctor(capsys)
    assert code == 1
    assert checks["key"] == (False, "MODELLIX_API_KEY is not set")


def test_zero_balance(local, sandbox, capsys):
    sandbox.balance = 0
    code, text, checks = run_doctor(capsys)
    assert code == 1
    assert line(text, "balance").startswith("FAIL")
    assert checks["balance"] == (False, "balance 0: submits will be refused (402)")
    assert [name for name, (ok, _) in checks.items() if not ok] == ["balance"]
    assert sandbox.api_key not in text


def test_unmigrated_database(local, tmp_path, capsys):
    local(DATABASE_URL=f"sqlite:///{tmp_path / 'empty.sqlite'}")
    code, text, checks = run_doctor(capsys)
    assert code == 1
    assert line(text, "database").startswith("FAIL")
    ok, detail = checks["database"]
    assert not ok and "not migrated (no revision; head is " in detail and "kling-worker db upgrade" in detail
    assert checks["pause"] == (False, "not checked: the database is not ready")
    assert checks["key"][0] and checks["balance"][0]  # the API checks do not depend on it


def test_unreachable_broker(local, capsys):
    port = closed_port()
    local(CELERY_BROKER_URL=f"amqp://guest:secret-pw@127.0.0.1:{port}//")
    code, text, checks = run_doctor(capsys)
    assert code == 1
    assert line(text, "broker").startswith("FAIL")
    ok, detail = checks["broker"]
    assert not ok and detail.startswith(f"amqp://guest:**@127.0.0.1:{port}// unreachable: ")
    assert checks["consumers"] == (False, "not checked: the broker is unreachable")
    assert "secret-pw" not in text


def test_unreachable_api(local, capsys):
    local(MODELLIX_BASE_URL=f"http://127.0.0.1:{closed_port()}")
    code, _, checks = run_doctor(capsys)
    assert code == 1
    assert not checks["api"][0] and "unreachable" in checks["api"][1]
    assert checks["key"] == (False, "not checked: the API is unreachable")
    assert checks["balance"] == (False, "not checked: no valid key")


def test_fleet_pause(local, capsys):
    set_budget(paused_until=time.time() + 120, pause_reason="402 from submit: insufficient balance")
    code, text, checks = run_doctor(capsys)
    assert code == 1
    assert line(text, "pause").startswith("FAIL")
    ok, detail = checks["pause"]
    assert not ok and detail.startswith("the fleet is paused for ")
    assert detail.endswith("s more: 402 from submit: insufficient balance")
    assert 100 < float(detail.split("for ", 1)[1].split("s more", 1)[0]) <= 120


def test_real_api_is_named(local):
    from worker.config import DEFAULT_BASE_URL, Settings

    found = doctor.check_base_url(Settings(base_url=DEFAULT_BASE_URL + "/"))
    assert found.ok and found.detail.startswith("the real Modellix API")


def test_the_line_per_tenant(local, capsys):
    from models import JobStatus, lifecycle, tenants
    from models.job import utcnow
    from worker import resources

    local()
    with resources.get().transaction() as s:
        tenants.set_policy(s, "web", utcnow(), weight=3.0, max_in_flight=2, max_rps=1.5)
        tenants.set_policy(s, "idle", utcnow(), weight=2.0)
        for i, (tenant, status) in enumerate(
            [("web", "queued"), ("web", "queued"), ("web", "submitted"), ("batch", "queued"), ("batch", "failed")]
        ):
            lifecycle.create(s, f"j{i}", JobStatus.queued, {"prompt": "x"}, None, utcnow(), tenant=tenant)
            if status == "submitted":
                lifecycle.take(s, f"j{i}", utcnow())
                lifecycle.mark_submitted(s, f"j{i}", utcnow(), task_id="t", answer={}, next_poll_at=utcnow())
            elif status == "failed":
                lifecycle.cancel(s, f"j{i}", utcnow())
    code, text, checks = run_doctor(capsys)
    assert line(text, "line").startswith("ok")
    assert checks["line"] == (
        True,
        "batch: 1 queued, 0 in flight, weight 1; web: 2 queued, 1 in flight, weight 3 (max 2 in flight, max 1.5/s)",
    )
