"""An archive row carried out after the job's end (worker.results.delivery._archive), and the two statements
only it runs: models.store.set_files (the job's files) and models.outbox.release_events (its events due).

The worker whose poll sees a task succeed archives the images before it writes the end; the outbox
archives later when that try failed for a reason that may pass, and when the end was written without
files (a success handed on in a message by a worker of an earlier version: `ended_unarchived`).
Real parts: the sandbox's result URLs, an archive folder in tmp_path, a webhook receiver, SQLite.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import requests
from sqlalchemy import select, update

from models import JobStatus, outbox, store
from models.db import make_engine, statement, transaction
from models.job import Job, utcnow
from models.outbox import Delivery, deliveries
from tests.support.jobs import handle, job
from worker import facts, resources
from worker.dev.receiver import WebhookReceiver
from worker.dev.sandbox import Step
from worker.polling import tracking
from worker.results import delivery

SECRET = "whsec_" + base64.b64encode(b"kling-worker test secret 32 bytes").decode()
LEASE = 77.0  # KLING_DELIVERY_LEASE here: what a claimed row's due_at is pushed ahead by


@pytest.fixture
def receiver():
    with WebhookReceiver(SECRET) as r:
        yield r


@pytest.fixture
def archiving(service, configure, tmp_path):
    """This process as a worker that archives to a folder and signs webhooks; tasks end as they start."""
    configure(
        KLING_WEBHOOK_SECRET=SECRET,
        KLING_ARCHIVE=(tmp_path / "results").as_uri(),
        KLING_DELIVERY_LEASE=LEASE,
    )
    service.task_seconds = 0
    return service


def ended_unarchived(job_id: str, n: int = 1, **contact) -> list[str]:
    """Submit a job and write its success without files, as a handed-on result of an earlier version
    is written: its archive row is pending now, its events wait for it. The task's result URLs."""
    handle(job_id=job_id, request={"prompt": f"picture {job_id}", "n": n}, **contact)
    res = resources.get()
    state = res.client.get_task(job(job_id).modellix_task_id)
    assert state.succeeded and len(state.result_urls) == n
    kept = facts.keep(res, facts.Succeeded(job_id, utcnow(), state.result_urls, state.raw))
    assert kept is facts.Kept.written
    return state.result_urls


def rows(job_id: str) -> dict[str, Delivery]:
    with resources.get().transaction() as s:
        return {d.channel: d for d in outbox.for_job(s, job_id)}


def states(job_id: str) -> dict[str, tuple[str, int]]:
    return {channel: (d.state, d.attempts) for channel, d in rows(job_id).items()}


def make_due(job_id: str, channel: str = "archive", **values) -> None:
    """The row's next try has come (and any other column as given)."""
    with resources.get().transaction() as s:
        s.execute(
            update(deliveries)
            .where(deliveries.c.job_id == job_id, deliveries.c.channel == channel)
            .values(due_at=utcnow() - timedelta(seconds=1), **values)
        )


def claim_archive(job_id: str) -> int:
    """The sweep's claim: the job's archive row is the one row due."""
    (delivery_id,) = delivery.due(resources.get())
    assert rows(job_id)["archive"].id == delivery_id
    return delivery_id


def kept_file(tmp_path: Path, job_id: str, index: int, url: str) -> dict:
    served = requests.get(url, timeout=10).content
    return {
        "uri": (tmp_path / "results" / job_id / f"{index}.png").as_uri(),
        "sha256": hashlib.sha256(served).hexdigest(),
        "bytes": len(served),
        "content_type": "image/png",
    }


def between(when: datetime | None, start: datetime, end: datetime) -> bool:
    return when is not None and start <= when <= end


# -- the archive row, carried out ------------------------------------------------------


CALLBACK = {"task": "images.ready", "queue": "images"}


@pytest.mark.parametrize("events", [["webhook"], ["callback"], ["webhook", "callback"]], ids="+".join)
def test_a_later_archive_keeps_the_images_then_hands_this_worker_the_events_it_released(
    archiving, receiver, tmp_path, events
):
    contact = {"webhook": receiver.url("/done"), "callback": CALLBACK}
    contact = {name: contact[name] for name in events}
    urls = ended_unarchived("later", n=2, **contact)
    assert states("later") == {"archive": ("pending", 0)} | {e: ("waiting", 0) for e in events}
    archive_id = claim_archive("later")
    start = utcnow()
    done = delivery.deliver(resources.get(), archive_id)
    end = utcnow()

    expected = [kept_file(tmp_path, "later", i, url) for i, url in enumerate(urls)]
    row = job("later")
    assert row.files == expected and row.status == "succeeded" and between(row.updated_at, start, end)
    archive = rows("later")["archive"]
    assert (archive.state, archive.attempts, archive.last_error, archive.due_at) == ("done", 1, None, None)
    assert between(archive.done_at, start, end)
    # The events are released and already claimed for this worker: due again only after the lease.
    released = rows("later")
    assert done.callback is None and sorted(done.then) == sorted(released[e].id for e in events)
    for name in events:
        event_row = released[name]
        assert (event_row.state, event_row.attempts) == ("pending", 1)
        lease = timedelta(seconds=LEASE)
        assert between(event_row.due_at, start + lease, end + lease)
    assert delivery.due(resources.get()) == []  # nothing left for the sweep

    # Carried out, each event has the files just archived.
    for delivery_id in done.then:
        sent = delivery.deliver(resources.get(), delivery_id)
        if sent.callback is not None:
            assert (sent.callback.task, sent.callback.queue) == ("images.ready", "images")
            assert sent.callback.event["files"] == expected
    if "webhook" in events:
        (hook,) = receiver.deliveries()
        assert hook.verified and hook.path == "/done" and json.loads(hook.body)["files"] == expected


def test_a_later_archive_of_a_job_without_events_settles_alone(archiving, tmp_path):
    (url,) = ended_unarchived("quiet")
    done = delivery.deliver(resources.get(), claim_archive("quiet"))
    assert done.then == () and done.callback is None
    assert job("quiet").files == [kept_file(tmp_path, "quiet", 0, url)]
    assert states("quiet") == {"archive": ("done", 1)}


def test_an_image_the_ending_poll_could_not_keep_is_fetched_again_alone(archiving, receiver, tmp_path):
    handle(job_id="again", request={"prompt": "x", "n": 2}, webhook=receiver.url())
    archiving.script(Step(500, on="result"))  # the first image's download at the end fails
    assert tracking.check(resources.get(), "again", 0) == tracking.Ended("again", notify=True)
    urls = job("again").result_urls
    first, second = job("again").files
    assert first["uri"] is None and "500" in first["error"] and second == kept_file(tmp_path, "again", 1, urls[1])
    assert states("again") == {"archive": ("pending", 1), "webhook": ("waiting", 0)}
    assert receiver.deliveries() == []  # the event waits for its files

    make_due("again")
    downloads = archiving.stats()["downloads"]
    done = delivery.deliver(resources.get(), claim_archive("again"))
    assert archiving.stats()["downloads"] == downloads + 1  # the image kept before is not fetched again
    expected = [kept_file(tmp_path, "again", 0, urls[0]), second]
    assert job("again").files == expected
    archive = rows("again")["archive"]
    assert (archive.state, archive.attempts, archive.last_error) == ("done", 2, None)
    assert done.then == (rows("again")["webhook"].id,)
    delivery.deliver(resources.get(), done.then[0])
    (hook,) = receiver.deliveries()
    assert json.loads(hook.body)["files"] == expected
    assert states("again") == {"archive": ("done", 2), "webhook": ("done", 1)}


def test_an_image_that_stays_unavailable_is_tried_later_with_a_growing_wait_then_given_up(archiving, receiver, caplog):
    ended_unarchived("flaky", webhook=receiver.url())
    for attempt, wait in ((1, 2.0), (2, 4.0)):  # 2, 4, 8 … seconds after try 1, 2, 3 …
        archiving.script(Step(503, on="result"))
        if attempt > 1:
            make_due("flaky")
        start = utcnow()
        done = delivery.deliver(resources.get(), claim_archive("flaky"))
        end = utcnow()
        assert done.then == ()
        (missing,) = job("flaky").files
        assert missing["uri"] is None and missing["error"].startswith("unavailable: ") and "503" in missing["error"]
        archive = rows("flaky")["archive"]
        assert (archive.state, archive.attempts, archive.last_error) == ("pending", attempt, missing["error"])
        assert between(archive.due_at, start + timedelta(seconds=wait), end + timedelta(seconds=wait))
        assert archive.done_at is None
        assert states("flaky")["webhook"] == ("waiting", 0)

    # The last of delivery.ARCHIVE_TRIES gives up: the row fails, and the event goes without the image.
    make_due("flaky", attempts=delivery.ARCHIVE_TRIES - 1)
    archiving.script(Step(503, on="result"))
    start = utcnow()
    done = delivery.deliver(resources.get(), claim_archive("flaky"))
    end = utcnow()
    (missing,) = job("flaky").files
    archive = rows("flaky")["archive"]
    assert (archive.state, archive.attempts, archive.last_error) == ("failed", delivery.ARCHIVE_TRIES, missing["error"])
    assert archive.due_at is None and between(archive.done_at, start, end)
    assert done.then == (rows("flaky")["webhook"].id,)
    (line,) = [r for r in caplog.records if getattr(r, "event", None) == "archive_failed"]
    assert line.getMessage() == f"job flaky: 1 of 1 images not archived: {missing['error']}"
    delivery.deliver(resources.get(), done.then[0])
    (hook,) = receiver.deliveries()
    assert json.loads(hook.body)["files"] == [missing]


def test_with_the_archive_off_the_row_is_settled_with_the_reason(archiving, configure, receiver, caplog):
    configure(KLING_ARCHIVE="off")
    ended_unarchived("off", n=2, webhook=receiver.url())
    done = delivery.deliver(resources.get(), claim_archive("off"))
    reason = "not archived: KLING_ARCHIVE is off"
    missing = {"uri": None, "sha256": None, "bytes": None, "content_type": None, "error": reason}
    assert job("off").files == [missing, missing]
    archive = rows("off")["archive"]
    assert (archive.state, archive.attempts, archive.last_error) == ("done", 1, f"{reason}; {reason}")
    assert done.then == (rows("off")["webhook"].id,)
    assert not [r for r in caplog.records if getattr(r, "event", None) == "archive_failed"]


# -- the statements ------------------------------------------------------------------------


@pytest.fixture
def engine(any_db_url):
    eng = make_engine(any_db_url)
    yield eng
    eng.dispose()


def put_job(engine, job_id: str, when: datetime, **values) -> None:
    with transaction(engine) as s:
        s.add(
            Job(
                id=job_id,
                status=JobStatus.succeeded.value,
                request={"prompt": "x"},
                created_at=when,
                updated_at=when,
                finished_at=when,
                result_urls=["https://example.com/0.png"],
                **values,
            )
        )


def put_row(engine, job_id: str, channel: str, state: str, when: datetime, due: datetime | None = None) -> None:
    with transaction(engine) as s:
        s.add(
            Delivery(
                job_id=job_id,
                channel=channel,
                state=state,
                attempts=0,
                due_at=due,
                created_at=when,
                updated_at=when,
                done_at=when if state in ("done", "failed") else None,
            )
        )


def table(engine) -> dict[tuple[str, str], tuple[str, datetime | None, datetime]]:
    with transaction(engine) as s:
        found = s.scalars(select(Delivery)).all()
        return {(d.job_id, d.channel): (d.state, d.due_at, d.updated_at) for d in found}


def test_release_events_makes_only_that_jobs_waiting_rows_due(engine):
    earlier = utcnow() - timedelta(minutes=5)
    later = earlier + timedelta(minutes=10)
    for job_id in ("a", "b"):
        put_job(engine, job_id, earlier, webhook="https://example.com/hook")
    put_row(engine, "a", "archive", "done", earlier)
    put_row(engine, "a", "webhook", "waiting", earlier)
    put_row(engine, "a", "callback", "waiting", earlier)
    put_row(engine, "b", "archive", "pending", earlier, due=later)
    put_row(engine, "b", "webhook", "waiting", earlier)
    now = utcnow()
    with statement(engine) as ex:
        outbox.release_events(ex, "a", now)
    assert table(engine) == {
        ("a", "archive"): ("done", None, earlier),
        ("a", "webhook"): ("pending", now, now),
        ("a", "callback"): ("pending", now, now),
        ("b", "archive"): ("pending", later, earlier),
        ("b", "webhook"): ("waiting", None, earlier),
    }


def test_set_files_records_where_the_images_are_and_changes_nothing_else(engine):
    earlier = utcnow() - timedelta(minutes=5)
    put_job(engine, "a", earlier)
    put_job(engine, "b", earlier)
    files = [
        {"uri": "file:///srv/results/a/0.png", "sha256": "ab" * 32, "bytes": 3, "content_type": "image/png"},
        {"uri": None, "sha256": None, "bytes": None, "content_type": None, "error": "expired: answered 403"},
    ]
    now = utcnow()
    with statement(engine) as ex:
        store.set_files(ex, "a", files, now)
    with transaction(engine) as s:
        a, b = s.get(Job, "a"), s.get(Job, "b")
        assert a.files == files and a.updated_at == now
        assert (a.status, a.finished_at, a.result_urls) == ("succeeded", earlier, ["https://example.com/0.png"])
        assert b.files is None and b.updated_at == earlier
    # A later try replaces the list whole.
    again = utcnow()
    with statement(engine) as ex:
        store.set_files(ex, "a", files[:1], again)
    with transaction(engine) as s:
        a = s.get(Job, "a")
        assert a.files == files[:1] and a.updated_at == again
