"""The Celery wiring's poll path (worker.wiring.tasks): what follows each poll (`_follow`, `follow`,
`follow_later`), and a stopping worker's hand-over of its scheduled polls (`hand_over`).

Real parts: the sandbox answers the polls, SQLite holds the jobs, a receiver verifies webhooks, and
the app publishes to the embedded broker (worker.wiring.embedded_broker) in the test's own folder,
from which each test takes the messages back as a worker would. A database that does not take a
job's end is a table gone from under it (tests/support/tables.py).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Queue
from kombu.exceptions import ChannelError
from sqlalchemy import select, update

from models import PollShape
from models.job import Job, utcnow
from models.outbox import for_job
from tests.support.jobs import handle, job, set_budget, submitted, wait_for
from tests.support.tables import table_away
from worker import resources
from worker.dev.receiver import WebhookReceiver
from worker.polling import schedule
from worker.polling.schedule import NextPoll
from worker.results import delivery
from worker.wiring import embedded_broker, tasks
from worker.wiring.app import app

SECRET = "whsec_" + base64.b64encode(b"kling-worker test secret 32 bytes").decode()
EMBEDDED = "worker.wiring.embedded_broker:Transport"
QUEUE = app.conf.task_default_queue  # where kling.* tasks go (KLING_QUEUE)


# -- the broker: the embedded one, in the test's folder -------------------------------


@dataclass(frozen=True)
class Sent:
    """A message as a worker takes it: the task, its keyword arguments, and when it is due (None: now)."""

    task: str
    kwargs: dict[str, Any]
    eta: datetime | None


class Broker:
    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        folders = {name: root / name for name in ("queue", "processed", "control", "unacked", "bad")}
        for folder in folders.values():
            folder.mkdir(parents=True)
        self.queue_folder = folders["queue"]
        self.options = {
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "processed_folder": str(folders["processed"]),
            "control_folder": str(folders["control"]),
            "unacked_folder": str(folders["unacked"]),
            "bad_folder": str(folders["bad"]),
            "store_processed": False,
        }
        self._monkeypatch = monkeypatch
        self._ours = False  # whether app's pool is one this broker made (the process's own is left alone)
        for name in ("CELERY_BROKER_URL", "CELERY_BROKER_WRITE_URL"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setitem(app.conf, "broker_url", "filesystem://localhost/")
        monkeypatch.setitem(app.conf, "broker_transport_options", self.options)
        self.use(EMBEDDED)

    def use(self, transport: str | type) -> None:
        """Publish through `transport` from now on (the app's pools are made afresh)."""
        self.close()
        self._monkeypatch.setitem(app.conf, "broker_transport", transport)
        self._monkeypatch.setattr(app, "_pool", None)
        self._monkeypatch.setattr(app.amqp, "_producer_pool", None)
        self._ours = True

    def refuse_after(self, count: int) -> None:
        """The broker takes `count` more messages, then refuses every one (its disk is full)."""
        room = [count]

        class FullChannel(embedded_broker.Channel):
            def _put(self, queue: str, payload: dict[str, Any], **kwargs: Any) -> None:
                if room[0] <= 0:
                    raise ChannelError(f"Cannot add message to {self.data_folder_out}: No space left on device")
                room[0] -= 1
                super()._put(queue, payload, **kwargs)

        class FullTransport(embedded_broker.Transport):
            Channel = FullChannel

        self.use(FullTransport)

    def taken(self, queue: str = QUEUE) -> list[Sent]:
        """Every message on `queue`, taken off it, in the order they were published."""
        found = []
        with Connection("filesystem://", transport=embedded_broker.Transport, transport_options=self.options) as conn:
            source = Queue(queue, channel=conn.channel())
            while (message := source.get(no_ack=True)) is not None:
                args, kwargs, _ = message.payload
                assert args == []  # the tasks take keyword arguments only
                eta = message.headers.get("eta")
                found.append(Sent(message.headers["task"], kwargs, datetime.fromisoformat(eta) if eta else None))
        return found

    def close(self) -> None:
        """Close the connections this broker's pool opened."""
        if self._ours and app._pool is not None:
            app._pool.force_close_all()


@pytest.fixture
def broker(tmp_path, monkeypatch) -> Iterator[Broker]:
    """The app publishes to an embedded broker in this test's folder."""
    found = Broker(tmp_path / "broker", monkeypatch)
    yield found
    found.close()


@pytest.fixture
def receiver():
    with WebhookReceiver(SECRET) as r:
        yield r


# -- helpers ---------------------------------------------------------------------------


def states(job_id: str) -> dict[str, tuple[str, int]]:
    with resources.get().transaction() as s:
        return {d.channel: (d.state, d.attempts) for d in for_job(s, job_id)}


def records(caplog, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


def teach() -> None:
    """This process's learner counts one job of the shape ("1k", 1, 0) that ended 3 s after its submit."""
    learner = resources.get().learner
    learner.first_poll("taught", {"prompt": "x"})
    learner.answered("taught", 1, 3.0, True)


def learned_row() -> PollShape | None:
    """The shared row of the shape `teach` taught."""
    with resources.get().transaction() as s:
        return s.scalars(select(PollShape).filter_by(resolution="1k", n=1, images=0)).first()


def assert_taught() -> None:
    row = learned_row()
    assert row is not None and row.seeded == 1 and math.isclose(row.log_first, schedule.seed(0.0, 3.0))


def drained() -> list[tuple[float, Any, tuple[Any, ...]]]:
    """What this process's poll timer has scheduled (the timer stops)."""
    poller = resources.get().poller_if_started
    assert poller is not None, "nothing was scheduled: the poll timer never started"
    return poller.drain(0)


# -- what follows a poll -----------------------------------------------------------------


def test_a_poll_that_finds_the_task_running_schedules_the_next_on_this_process_timer(service, broker, caplog):
    caplog.set_level(logging.INFO, logger="kling_worker")
    service.task_seconds = 30
    submitted("p")
    tasks.follow("p", 0)  # the timer's entry point: this process's resources
    assert resources.get().poller.pending() == 1
    ((delay, fn, args),) = drained()
    assert fn is tasks.follow and args == ("p", 1) and 2.0 < delay <= 2.5  # the schedule's second gap
    row = job("p")
    assert row.status == "submitted" and row.polls == 1
    assert broker.taken() == []  # nothing through the broker
    assert records(caplog, "result_handed_on") == []


def test_follow_later_puts_the_poll_on_the_timer_with_its_number_and_delay(service):
    res = resources.get()
    assert res.poller_if_started is None
    tasks.follow_later(res, "later-1", NextPoll(4, 7.5))
    tasks.follow_later(res, "later-2", NextPoll(0, 3.0))
    left = drained()
    assert [(fn, args) for _, fn, args in left] == [(tasks.follow, ("later-2", 0)), (tasks.follow, ("later-1", 4))]
    assert 2.5 < left[0][0] <= 3.0 and 7.0 < left[1][0] <= 7.5


def test_a_result_the_database_did_not_take_before_the_stop_travels_on_in_a_message(service, broker, caplog):
    caplog.set_level(logging.INFO, logger="kling_worker")
    service.task_seconds = 0  # the first poll finds the task done
    submitted("h")
    res = resources.get()
    res.stopping.set()  # the worker was asked to stop: a held result is not kept waiting
    with table_away("deliveries"):  # a job's end is written with its outbox rows: that write fails
        tasks._follow(res, "h", 0)
    assert job("h").status == "submitted"  # not written here
    (sent,) = broker.taken()
    assert sent.task == "kling.poll" and sent.eta is None
    assert set(sent.kwargs) == {"job_id", "seq", "fact"} and (sent.kwargs["job_id"], sent.kwargs["seq"]) == ("h", 0)
    fact = sent.kwargs["fact"]
    assert (fact["kind"], fact["job_id"]) == ("succeeded", "h")
    (url,) = fact["values"]["result_urls"]
    assert url.startswith(service.url) and fact["values"]["archived"]["state"] == "done"
    (kept,) = fact["values"]["files"]
    assert Path(kept["uri"].removeprefix("file://")).is_file()  # archived before the write was tried
    (line,) = records(caplog, "result_handed_on")
    assert line.levelno == logging.INFO and line.job_id == "h"
    assert line.getMessage() == "job h: its succeeded result travels on in a message (the database is away)"
    assert res.poller_if_started is None  # no further poll here

    # Another worker takes the message: the fact it carries is the whole result.
    res.stopping.clear()
    tasks.redispatched_poll(**sent.kwargs)
    row = job("h")
    assert row.status == "succeeded" and row.result_urls == [url] and row.files == [kept]
    assert states("h") == {"archive": ("done", 1)}


def test_the_poll_that_ends_a_job_with_events_sends_them_at_once(service, configure, broker, receiver, tmp_path):
    configure(KLING_WEBHOOK_SECRET=SECRET, KLING_ARCHIVE=(tmp_path / "results").as_uri())
    service.task_seconds = 0
    handle(
        job_id="e",
        request={"prompt": "x"},
        webhook=receiver.url("/done"),
        callback={"task": "images.ready", "queue": "images"},
    )
    tasks._follow(resources.get(), "e", 0)
    # Sent by the time the poll's thread is done: no sweep, no message in between.
    (hook,) = receiver.deliveries()
    assert hook.verified and hook.path == "/done" and hook.status == 200
    event = json.loads(hook.body)
    assert event["type"] == "job.succeeded" and event["job_id"] == "e" and event["files"] == job("e").files
    assert broker.taken("images") == [Sent("images.ready", {"event": event}, None)]
    assert states("e") == {"archive": ("done", 1), "webhook": ("done", 1), "callback": ("done", 1)}
    assert broker.taken() == [] and resources.get().poller_if_started is None


def test_a_job_ended_without_its_events_due_leaves_them_to_the_sweep(service, configure, broker, receiver):
    configure(KLING_WEBHOOK_SECRET=SECRET)
    service.task_seconds = 60
    handle(job_id="late", request={"prompt": "x"}, webhook=receiver.url())
    with resources.get().transaction() as s:  # past its deadline (60 s)
        s.execute(update(Job).where(Job.id == "late").values(submitted_at=utcnow() - timedelta(seconds=61)))
    set_budget(paused_until=time.time() + 30, pause_reason="429 from Modellix")  # no request may go now
    configure()  # the poll is made by another worker (its first look at the pause reads the row)
    tasks._follow(resources.get(), "late", 0)
    row = job("late")
    assert row.status == "failed" and row.error_code == "timeout"
    # This poll did not send the event (tracking.check said notify=False): the sweep hands it out.
    assert receiver.deliveries() == [] and states("late") == {"webhook": ("pending", 0)}
    assert len(delivery.due(resources.get())) == 1
    assert broker.taken() == [] and resources.get().poller_if_started is None


def test_a_poll_that_is_not_this_process_s_to_make_does_nothing(service, broker, caplog):
    caplog.set_level(logging.INFO, logger="kling_worker")
    service.task_seconds = 30
    submitted("s")
    tasks._follow(resources.get(), "s", 3)  # the row expects poll 0: a stale or duplicate message
    tasks._follow(resources.get(), "nobody", 0)  # no such job
    assert job("s").polls == 0 and job("s").status == "submitted"
    assert resources.get().poller_if_started is None and broker.taken() == []
    assert records(caplog, "result_handed_on") == []


# -- a stopping worker's hand-over ------------------------------------------------------------


def test_a_process_that_never_polled_only_merges_what_it_learned(service, broker):
    teach()
    assert learned_row() is None
    assert tasks.hand_over(resources.get()) == 0
    assert_taught()
    assert resources.get().poller_if_started is None  # asking did not start a timer
    assert broker.taken() == []


def test_a_stopping_process_hands_its_scheduled_polls_to_the_other_workers(service, broker, caplog):
    caplog.set_level(logging.INFO, logger="kling_worker")
    teach()
    res = resources.get()
    tasks.follow_later(res, "b", NextPoll(3, 30.0))
    tasks.follow_later(res, "a", NextPoll(1, 5.0))
    res.poller.schedule(60.0, print, "not", "a poll")  # only the timer's polls are handed over
    before = datetime.now(UTC)
    assert tasks.hand_over(res) == 2
    after = datetime.now(UTC)
    sent = broker.taken()
    assert [(s.task, s.kwargs) for s in sent] == [
        ("kling.poll", {"job_id": "a", "seq": 1}),  # in the order they are due
        ("kling.poll", {"job_id": "b", "seq": 3}),
    ]
    # Each due when it would have been here.
    assert before + timedelta(seconds=4) < sent[0].eta <= after + timedelta(seconds=5)
    assert before + timedelta(seconds=29) < sent[1].eta <= after + timedelta(seconds=30)
    (line,) = records(caplog, "polls_handed_over")
    assert line.levelno == logging.INFO
    assert line.getMessage() == "stopping: handed 2 scheduled polls over to the other workers"
    assert records(caplog, "hand_over_incomplete") == []
    assert res.poller.pending() == 0
    assert_taught()  # what the polls taught is merged before the process goes


def test_polls_in_progress_end_before_the_hand_over_and_their_next_poll_goes_too(service, broker):
    service.task_seconds = 30
    submitted("run")
    service.set_faults(latency=0.5)  # the poll is in flight while the worker stops
    res = resources.get()
    tasks.follow_later(res, "run", NextPoll(0, 0.0))
    wait_for(lambda: res.poller.pending() == 0, 5, "the timer to start the poll")
    before = datetime.now(UTC)
    assert tasks.hand_over(res) == 1
    assert job("run").polls == 1  # the poll was made
    (sent,) = broker.taken()
    assert (sent.task, sent.kwargs) == ("kling.poll", {"job_id": "run", "seq": 1})
    assert before + timedelta(seconds=1) < sent.eta <= datetime.now(UTC) + timedelta(seconds=2.5)


def test_with_no_poll_scheduled_nothing_is_sent_or_said(service, broker, caplog):
    caplog.set_level(logging.INFO, logger="kling_worker")
    res = resources.get()
    res.poller.schedule(60.0, print, "not a poll")
    assert tasks.hand_over(res) == 0
    assert broker.taken() == []
    assert records(caplog, "polls_handed_over") == [] and records(caplog, "hand_over_incomplete") == []


def test_a_broker_that_refuses_part_way_leaves_the_rest_to_the_sweep(service, broker, caplog):
    teach()
    res = resources.get()
    for seq, delay in ((1, 5.0), (2, 10.0), (3, 20.0)):
        tasks.follow_later(res, f"j{seq}", NextPoll(seq, delay))
    broker.refuse_after(1)
    assert tasks.hand_over(res) == 1
    assert [s.kwargs for s in broker.taken()] == [{"job_id": "j1", "seq": 1}]
    (line,) = records(caplog, "hand_over_incomplete")
    assert line.levelno == logging.WARNING
    said = line.getMessage()
    assert said.startswith("stopping: the broker took 1 of 3 scheduled polls (") and "No space left on device" in said
    assert said.endswith("); the sweep re-dispatches the rest when they are 10s overdue")
    assert records(caplog, "polls_handed_over") == []
    assert_taught()  # merged before anything was sent


def test_a_broker_that_is_gone_takes_none(service, broker, caplog):
    res = resources.get()
    tasks.follow_later(res, "x", NextPoll(1, 5.0))
    tasks.follow_later(res, "y", NextPoll(2, 6.0))
    shutil.rmtree(broker.queue_folder)  # the embedded broker's folder is gone: an OSError
    assert tasks.hand_over(res) == 0
    (line,) = records(caplog, "hand_over_incomplete")
    assert line.getMessage().startswith("stopping: the broker took 0 of 2 scheduled polls (")
    assert "No such file or directory" in line.getMessage()
