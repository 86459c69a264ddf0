"""`kling-worker doctor` on a healthy setup: real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import time
import uuid

import pytest
from kombu import Connection, Consumer, Queue

from tests.support.cli import run_doctor


@pytest.mark.services
def test_healthy_setup_is_all_ok(pg_url, rabbit_url, sandbox, configure, capsys):
    queue = "doctor-" + uuid.uuid4().hex[:8]
    configure(
        CELERY_BROKER_URL=rabbit_url,
        DATABASE_URL=pg_url,
        KLING_QUEUE=queue,
        MODELLIX_BASE_URL=sandbox.url,
        MODELLIX_API_KEY=sandbox.api_key,
    )
    code, _, checks = run_doctor(capsys)
    assert code == 1
    assert checks["consumers"] == (False, f"queue {queue!r} does not exist: no worker has started on it")
    with Connection(rabbit_url) as conn:
        declared = Queue(queue, auto_delete=False, durable=False)
        declared(conn.channel()).declare()
        try:
            # The queue exists but nobody reads it: a FAIL that names the queue.
            code, text, checks = run_doctor(capsys)
            assert code == 1
            assert checks["consumers"] == (
                False,
                f"queue {queue!r}: 0 consumer(s), 0 message(s) waiting: no worker is taking jobs",
            )
            with Consumer(conn.channel(), [declared], callbacks=[lambda *_: None]):
                time.sleep(0.2)  # basic_consume is asynchronous on the broker's side
                code, text, checks = run_doctor(capsys)
        finally:
            declared(conn.channel()).delete()
    assert code == 0, text
    assert all(row.startswith("ok ") for row in text.splitlines()), text
    assert len(text.splitlines()) == len(checks) == 9
    assert checks["line"] == (True, "no job waiting or in flight")
    assert sandbox.api_key not in text
    assert "guest:guest" not in text  # the broker's password is masked
    assert checks["consumers"] == (True, f"queue {queue!r}: 1 consumer(s), 0 message(s) waiting")
    assert checks["database"][0] and " reachable, at head (" in checks["database"][1]
    assert checks["key"] == (True, "key valid")
    assert checks["balance"] == (True, "balance 100")
    assert checks["pause"] == (True, "no fleet pause")
    assert checks["base url"] == (True, f"not the real API: {sandbox.url} (a sandbox or a proxy)")
