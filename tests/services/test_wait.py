"""Waiting on a RabbitMQ queue nobody consumes."""

from __future__ import annotations

import uuid

import pytest

from tests.support.cli import delete_queue, run_cli


@pytest.mark.services
def test_a_queue_nobody_consumes_is_named(rabbit_url, embedded):
    queue = "nobody-" + uuid.uuid4().hex[:8]
    env = {**embedded, "CELERY_BROKER_URL": rabbit_url, "KLING_QUEUE": queue}
    try:
        done = run_cli(["enqueue", "a cat", "--job-id", "alone-1", "--wait", "--timeout", "4"], env)
    finally:
        delete_queue(rabbit_url, queue)
    assert done.returncode == 1, done.stderr
    waiting = [line for line in done.stderr.splitlines() if " waiting: " in line]
    assert len(waiting) == 1, done.stderr
    said = f"waiting: queue {queue!r}: 0 consumer(s), 1 message(s) waiting: no worker is taking jobs"
    assert waiting[0].endswith(said)
