"""The CLI and the embedded default without a worker: the migration against the models, a sandbox port
already taken, the task-event settings. With real workers: tests/e2e/test_cli_and_embedded.py."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from sqlalchemy import create_engine

from tests.support.cli import embedded_env, run_checked
from worker.dev.processes import ROOT

CLI = [sys.executable, "-m", "worker.cli"]


def test_alembic_migration_matches_the_models(any_db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from models import Base
    from models.db import normalise_url

    engine = create_engine(normalise_url(any_db_url))
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def test_the_embedded_worker_says_in_one_line_that_the_sandbox_port_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_checked(["worker", "--sandbox", "--sandbox-port", str(port)], embedded_env(tmp_path), check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and f"127.0.0.1:{port}" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("broker", "setting", "expected"),
    [
        ("", None, [False, False]),
        ("", "true", [False, False]),  # never on the embedded broker
        ("amqp://guest:guest@127.0.0.1:1//", None, [False, True]),  # task events wait for a monitor to ask
        ("amqp://guest:guest@127.0.0.1:1//", "true", [True, True]),
    ],
)
def test_task_events_follow_the_setting_except_on_the_embedded_broker(tmp_path, broker, setting, expected):
    """worker_send_task_events and task_send_sent_event (tests/e2e/test_flower.py sees the events themselves)."""
    extra = ({"CELERY_BROKER_URL": broker} if broker else {}) | ({"KLING_TASK_EVENTS": setting} if setting else {})
    env = embedded_env(tmp_path, **extra)
    code = "from worker.wiring.app import app; print(app.conf.worker_send_task_events, app.conf.task_send_sent_event)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == [str(e) for e in expected], done.stderr
