"""Results reach the caller (worker.results.delivery): archive, then a signed webhook and a callback, in process.

Real parts: the sandbox serves the result images (and lets them expire), a
receiver verifies each webhook with the public `standardwebhooks` package
(worker/dev/receiver.py), the archive is a folder, and the database is SQLite here and PostgreSQL
in tests/services/test_delivery.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path

import pytest
import requests

from tests.support.jobs import handle, job
from worker import cli, resources, submission
from worker.dev.receiver import WebhookReceiver
from worker.polling import tracking
from worker.results import delivery, webhooks
from worker.wiring import tasks

SECRET = "whsec_" + base64.b64encode(b"kling-worker test secret 32 bytes").decode()


@pytest.fixture
def receiver():
    with WebhookReceiver(SECRET) as r:
        yield r


@pytest.fixture
def delivering(service, configure, tmp_path, monkeypatch):
    """This process as a worker that archives to a folder and signs with SECRET; retries come at once."""
    configure(KLING_WEBHOOK_SECRET=SECRET, KLING_ARCHIVE=(tmp_path / "results").as_uri())
    monkeypatch.setattr(webhooks, "next_attempt_delay", lambda attempt, retry_after=None: 0.0)
    return service


def run_to_end(job_id: str, **kwargs) -> None:
    """Handle a message and poll its task until the job ends, as a worker would."""
    out = handle(job_id=job_id, **kwargs)
    seq = 0
    while isinstance(out.next_step, submission.Follow) and job(job_id).status not in ("succeeded", "failed"):
        following = tracking.check(resources.get(), job_id, seq)
        if isinstance(following, tracking.PollAgain):
            seq = following.poll.seq
        time.sleep(0.2)


def run_deliveries(timeout: float = 20.0) -> list[delivery.Callback]:
    """Claim and carry out the outbox until nothing is due; the callbacks a worker would send."""
    callbacks: list[delivery.Callback] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        due = delivery.due(resources.get())
        if not due:
            return callbacks
        while due:
            delivery_id = due.pop(0)
            done = delivery.deliver(resources.get(), delivery_id)
            due += done.then
            if done.callback is not None:
                callbacks.append(done.callback)
                delivery.sent(resources.get(), delivery_id)
    raise AssertionError("deliveries still due after the timeout")


def states(job_id: str) -> dict[str, tuple[str, int]]:
    with resources.get().transaction() as s:
        from models import outbox

        return {d.channel: (d.state, d.attempts) for d in outbox.for_job(s, job_id)}


def test_a_succeeded_job_is_archived_then_its_event_signed_and_sent(delivering, receiver, tmp_path):
    run_to_end(
        "ok-1",
        request={"prompt": "x", "n": 2},
        metadata={"order": 7},
        webhook=receiver.url("/done"),
        callback={"task": "images.ready", "queue": "images"},
    )
    callbacks = run_deliveries()
    (sent,) = receiver.wait_for(1)
    assert sent.verified and sent.headers["webhook-id"] == delivery.event_id("ok-1")
    event = json.loads(sent.body)
    row = job("ok-1")
    assert event["type"] == "job.succeeded" and event["status"] == "succeeded" and event["job_id"] == "ok-1"
    assert event["metadata"] == {"order": 7} and event["result_urls"] == row.result_urls
    assert event["modellix_task_id"] == row.modellix_task_id and event["finished_at"]
    assert len(event["files"]) == 2 and event["files"] == row.files
    for index, (found, url) in enumerate(zip(event["files"], row.result_urls, strict=True)):
        kept = Path(found["uri"].removeprefix("file://")).read_bytes()
        assert found["uri"].endswith(f"/ok-1/{index}.png") and found["content_type"] == "image/png"
        assert (
            found["sha256"] == hashlib.sha256(kept).hexdigest() == hashlib.sha256(requests.get(url).content).hexdigest()
        )
        assert found["bytes"] == len(kept)
    assert [(c.task, c.queue, c.event) for c in callbacks] == [("images.ready", "images", event)]
    assert states("ok-1") == {"archive": ("done", 1), "webhook": ("done", 1), "callback": ("done", 1)}
    assert delivering.api_key not in repr(sent.headers) + sent.body.decode()


def test_the_poll_that_ends_a_job_writes_the_end_with_its_images_already_archived(delivering):
    run_to_end("inline-1", request={"prompt": "x", "n": 2})
    # No outbox work is left for anyone: the end was written with the files and a settled archive row.
    row = job("inline-1")
    assert row.status == "succeeded" and len(row.files) == 2
    assert all(Path(f["uri"].removeprefix("file://")).is_file() for f in row.files)
    assert states("inline-1") == {"archive": ("done", 1)}
    assert delivery.due(resources.get()) == []


def test_the_ending_poll_says_whether_events_follow_and_they_go_at_once(delivering, receiver):
    handle(job_id="hooked", request={"prompt": "x"}, webhook=receiver.url())
    handle(job_id="plain", request={"prompt": "x"})
    endings = {}
    for job_id in ("hooked", "plain"):
        following = tracking.check(resources.get(), job_id, 0)
        while isinstance(following, tracking.PollAgain):
            time.sleep(0.2)
            following = tracking.check(resources.get(), job_id, following.poll.seq)
        endings[job_id] = following
    # Only the job with a webhook has rows to claim at its end; the other is spared the claim.
    assert endings == {"hooked": tracking.Ended("hooked", notify=True), "plain": tracking.Ended("plain", notify=False)}
    tasks.carry_out(
        resources.get(), delivery.claim_ended(resources.get(), "hooked")
    )  # what the poll's thread does next (tasks.follow)
    (sent,) = receiver.wait_for(1)
    assert sent.verified and json.loads(sent.body)["files"] == job("hooked").files
    assert states("hooked") == {"archive": ("done", 1), "webhook": ("done", 1)}


def test_a_receiver_that_fails_at_first_gets_the_same_event_again(delivering, receiver):
    receiver.fail_next(1, how="500")
    receiver.fail_next(1, how="drop")
    run_to_end("retry-1", request={"prompt": "x"}, webhook=receiver.url())
    run_deliveries()
    first, second, third = receiver.wait_for(3)
    assert (first.status, second.status, third.status) == (500, None, 200)
    assert len({d.headers["webhook-id"] for d in (first, second, third)}) == 1 and third.verified
    assert first.body == third.body
    assert states("retry-1")["webhook"] == ("done", 3)


def test_expired_result_urls_still_send_the_event_saying_what_is_missing(delivering, receiver):
    delivering.result_ttl = 0.0  # the URLs expire as the task ends
    run_to_end("late-1", request={"prompt": "x"}, webhook=receiver.url())
    run_deliveries()
    event = json.loads(receiver.wait_for(1)[0].body)
    assert event["type"] == "job.succeeded" and event["files"][0]["uri"] is None
    assert "403" in event["files"][0]["error"]
    assert states("late-1") == {"archive": ("failed", 1), "webhook": ("done", 1)}  # not retried: expired


def test_a_rejected_job_with_a_webhook_gets_its_event_at_once(delivering, receiver):
    handle(job_id="bad-1", request={"prompt": "x", "n": 0}, webhook=receiver.url(), metadata={"k": 1})
    run_deliveries()
    event = json.loads(receiver.wait_for(1)[0].body)
    assert event["type"] == "job.rejected" and event["error_code"] == "validation" and "n" in event["error_message"]
    assert event["metadata"] == {"k": 1} and event["files"] == [] and states("bad-1") == {"webhook": ("done", 1)}


def test_a_webhook_this_fleet_cannot_sign_or_may_not_call_is_a_rejection(service, configure, receiver):
    out = handle(job_id="nosecret", request={"prompt": "x"}, webhook=receiver.url())
    assert out.status.value == "rejected" and "KLING_WEBHOOK_SECRET" in job("nosecret").error_message
    configure(KLING_WEBHOOK_SECRET=SECRET, KLING_WEBHOOK_HOSTS="hooks.example.com")
    out = handle(job_id="elsewhere", request={"prompt": "x"}, webhook=receiver.url())
    assert out.status.value == "rejected" and "KLING_WEBHOOK_HOSTS" in job("elsewhere").error_message
    assert service.stats()["submits"] == 0 and receiver.deliveries() == []


def test_redeliver_sends_an_ended_event_again_and_results_get_copies_the_images(delivering, receiver, tmp_path, capsys):
    run_to_end("again-1", request={"prompt": "x"}, webhook=receiver.url())
    run_deliveries()
    assert cli.main(["jobs", "redeliver", "again-1"]) == 0
    run_deliveries()
    first, second = receiver.wait_for(2)
    assert first.headers["webhook-id"] == second.headers["webhook-id"] and first.body == second.body
    assert cli.main(["jobs", "redeliver", "nothing-here"]) == 1
    capsys.readouterr()
    assert cli.main(["results", "get", "again-1", "--out", str(tmp_path / "copy")]) == 0
    (written,) = [Path(line) for line in capsys.readouterr().out.split()]
    assert hashlib.sha256(written.read_bytes()).hexdigest() == job("again-1").files[0]["sha256"]
    assert cli.main(["jobs", "show", "again-1"]) == 0
    shown = capsys.readouterr().out
    assert "file 0: file://" in shown and "webhook: done after 1 attempt(s)" in shown


def test_a_callback_the_broker_refused_is_tried_again(delivering):
    run_to_end("cb-1", request={"prompt": "x"}, callback={"task": "t", "queue": "q"})
    run_deliveries()  # the archive; the callback comes back as one to send
    assert states("cb-1")["callback"] == ("done", 1)
    assert cli.main(["jobs", "redeliver", "cb-1"]) == 0
    (delivery_id,) = delivery.due(resources.get())
    assert delivery.deliver(resources.get(), delivery_id).callback is not None
    delivery.not_sent(resources.get(), delivery_id, "the broker refused the callback: connection refused")
    assert states("cb-1")["callback"] == ("pending", 1)
    (again,) = delivery.due(resources.get())
    assert again == delivery_id and delivery.deliver(resources.get(), delivery_id).callback.task == "t"


def test_images_archived_to_an_s3_compatible_store_come_back_with_their_digests(
    service, configure, receiver, bucket, tmp_path, capsys
):
    configure(KLING_WEBHOOK_SECRET=SECRET, KLING_ARCHIVE=f"s3://{bucket}/results")
    run_to_end("s3-1", request={"prompt": "x", "n": 2}, webhook=receiver.url())
    run_deliveries()
    event = json.loads(receiver.wait_for(1)[0].body)
    assert [f["uri"] for f in event["files"]] == [f"s3://{bucket}/results/s3-1/{i}.png" for i in range(2)]
    assert cli.main(["results", "get", "s3-1", "--out", str(tmp_path / "got")]) == 0
    written = [Path(line) for line in capsys.readouterr().out.split()]
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in written] == [f["sha256"] for f in event["files"]]
