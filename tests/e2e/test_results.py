"""Results reach the caller, with real worker processes on RabbitMQ + PostgreSQL: verified webhooks,
callbacks received by a Celery service of the caller's own, and archived images whose digests match,
including when the receiver fails at first, when result URLs expire soon after the task ends, and
when the worker carrying out a delivery is killed."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from pathlib import Path

import pytest

from tests.support.jobs import wait_for, wait_terminal
from worker.dev.jobs import valid, worker_env
from worker.dev.processes import Worker, produce
from worker.dev.receiver import WebhookReceiver
from worker.results import delivery

pytestmark = [pytest.mark.services, pytest.mark.slow]

SECRET = "whsec_" + base64.b64encode(b"kling-worker results test secret").decode()


def callbacks_in(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_every_job_gets_a_verified_webhook_a_callback_and_its_images(rabbit_url, pg_url, sandbox, tmp_path):
    sandbox.task_seconds = 1.0
    sandbox.result_ttl = 5.0  # the URLs expire 5 s after the task ends
    env = worker_env(
        rabbit_url, pg_url, sandbox, tmp_path, KLING_WEBHOOK_SECRET=SECRET, KLING_ARCHIVE=(tmp_path / "kept").as_uri()
    )
    queue, log = f"callbacks-{uuid.uuid4().hex[:6]}", tmp_path / "callbacks.jsonl"
    caller_env = {"CALLBACK_BROKER": rabbit_url, "CALLBACK_QUEUE": queue, "CALLBACK_LOG": str(log)}
    with WebhookReceiver(SECRET) as receiver:
        receiver.fail_next(4, how="500")  # the receiver fails at first
        workers = [Worker(env, tmp_path, concurrency=8, beat=(i == 0)) for i in range(2)]
        caller = Worker(caller_env, tmp_path, concurrency=2, app="tests.support.callback_app")
        try:
            for w in [*workers, caller]:
                w.wait_ready()
            tag = uuid.uuid4().hex[:6]
            messages = [
                dict(valid(tag, i), webhook=receiver.url(), callback={"task": "images.ready", "queue": queue})
                for i in range(12)
            ]
            produce(rabbit_url, env["KLING_QUEUE"], messages)
            found = wait_terminal(pg_url, len(messages), 120, workers)
            wait_for(lambda: len(callbacks_in(log)) >= len(messages), 60, "every callback", [*workers, caller])
            wait_for(
                lambda: (
                    len({d.headers["webhook-id"] for d in receiver.deliveries() if d.status == 200}) >= len(messages)
                ),
                90,
                "every webhook answered 200",
                workers,
            )
        finally:
            for w in [*workers, caller]:
                w.stop()
        delivered = [d for d in receiver.deliveries() if d.status == 200]
    assert all(d.verified for d in receiver.deliveries())
    events = {json.loads(d.body)["job_id"]: json.loads(d.body) for d in delivered}
    assert set(events) == {m["job_id"] for m in messages} and all(e["type"] == "job.succeeded" for e in events.values())
    assert {e["job_id"]: e for e in callbacks_in(log)} == events  # the callback carries the same event
    for m in messages:
        event, row = events[m["job_id"]], found[m["job_id"]]
        assert event["metadata"] == m["metadata"]
        assert len(event["files"]) == m["request"]["n"] == len(row.result_urls)
        for f in event["files"]:
            assert hashlib.sha256(Path(f["uri"].removeprefix("file://")).read_bytes()).hexdigest() == f["sha256"]
    assert len(receiver.deliveries()) == len(messages) + 4  # each failure was tried again, nothing more


def test_a_worker_killed_while_delivering_leaves_the_event_to_another(rabbit_url, pg_url, sandbox, tmp_path):
    sandbox.task_seconds = 0.5
    env = worker_env(rabbit_url, pg_url, sandbox, tmp_path, KLING_WEBHOOK_SECRET=SECRET, KLING_DELIVERY_LEASE=5)
    with WebhookReceiver(SECRET) as receiver:
        receiver.fail_next(1, how="slow", delay=60)  # the first delivery hangs in the receiver
        first = Worker(env, tmp_path, concurrency=4, beat=True).wait_ready()
        second = None
        try:
            produce(rabbit_url, env["KLING_QUEUE"], [dict(valid("kill", 0), webhook=receiver.url())])
            receiver.wait_for(1, timeout=60)  # the worker is inside the POST
            first.kill()
            second = Worker(env, tmp_path, concurrency=4, beat=True).wait_ready()
            hung, done = receiver.wait_for(2, timeout=60)
        finally:
            first.kill()
            if second is not None:
                second.stop()
    assert done.status == 200 and done.verified and hung.headers["webhook-id"] == done.headers["webhook-id"]
    assert done.headers["webhook-id"] == delivery.event_id("kill-0") and json.loads(done.body)["job_id"] == "kill-0"
