"""The shape of an outage in the log (worker.ops.outages): one line when it starts, a summary while
it lasts, one line when it ends; the backoff of messages it puts off."""

from __future__ import annotations

import logging
import time

import pytest
from sqlalchemy.exc import OperationalError

from worker.ops import outages


def failure(text: str = "connection refused\nIs the server running?") -> OperationalError:
    return OperationalError("SELECT secret_stuff FROM jobs", {"p": 1}, Exception(text))


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kling_worker.outages"]


def test_an_outage_logs_one_warning_when_it_starts_and_one_line_when_it_ends(caplog):
    caplog.set_level(logging.INFO)
    outage = outages.database()
    for _ in range(50):
        outage.defer("messages", failure())
    outage.defer("polls", failure())
    outage.still(failure())
    outage.holding(+1)
    assert outage.down
    outage.ok(time.monotonic() - 60)  # a statement that began before the failures proves nothing
    assert outage.down
    outage.ok(time.monotonic())
    outage.ok(time.monotonic())
    assert not outage.down
    start, end = lines(caplog)
    assert start.startswith("database unreachable (Exception: connection refused)")
    assert "held in memory" in start and "SELECT" not in start  # what happens meanwhile; not the statement
    assert end.startswith("database reachable again after 0s") and "50 messages, 1 polls" in end
    assert "held in memory now: 1" in end
    assert all(r.levelname == "WARNING" and not r.exc_info for r in caplog.records)


def test_a_long_outage_is_summarised_every_so_often(caplog, monkeypatch):
    monkeypatch.setattr(outages, "SUMMARY_EVERY", 0.0)
    outage = outages.database()
    outage.defer("messages", failure())
    outage.defer("messages", failure())
    outage.still(failure())
    assert [line.split(" (")[0] for line in lines(caplog)] == [
        "database unreachable",
        "database still unreachable after 0s",
        "database still unreachable after 0s",
    ]
    assert "2 messages" in lines(caplog)[-1]


def test_a_new_outage_after_the_end_starts_its_own_count(caplog):
    outage = outages.database()
    outage.defer("messages", failure())
    outage.ok(time.monotonic())
    outage.defer("polls", failure())
    outage.ok(time.monotonic())
    assert "put off meanwhile: 1 polls;" in lines(caplog)[-1]
    assert outage.quiet_for() < 1.0
    assert outages.database().quiet_for() == float("inf")


@pytest.mark.parametrize("retries, low, high", [(0, 0.5, 1.0), (3, 4.0, 8.0), (20, 15.0, 30.0)])
def test_messages_put_off_by_an_outage_back_off_up_to_a_ceiling(retries, low, high):
    delays = [outages.backoff(retries) for _ in range(200)]
    assert low <= min(delays) and max(delays) <= high and len(set(delays)) > 1


def test_the_brokers_lines_become_one_outage_and_other_records_pass(caplog):
    caplog.set_level(logging.INFO)
    outages.shape_broker_logs()
    outages.shape_broker_logs()  # once per logger, however often a process starts
    consumer = logging.getLogger("celery.worker.consumer.consumer")
    assert sum(isinstance(f, outages.BrokerLogShape) for f in consumer.filters) == 1
    consumer.warning("consumer: Connection to broker lost. Trying to re-establish the connection...")
    for _ in range(3):
        consumer.error("consumer: Cannot connect to amqp://guest:**@host//: [Errno 111] Connection refused.")
    logging.getLogger("celery.beat").error("Message Error: Couldn't apply scheduled task kling-sweep: refused")
    consumer.error("consumer: something else entirely")  # not about the connection: kept as it is
    logging.getLogger("celery.worker.consumer.connection").info("Connected to amqp://guest:**@host//")
    shown = [(r.name, r.getMessage().split(";")[0]) for r in caplog.records]
    assert shown == [
        (
            "kling_worker.outages",
            "broker unreachable (consumer: Connection to broker lost. Trying to re-establish the connection...)",
        ),
        ("celery.worker.consumer.consumer", "consumer: something else entirely"),
        ("kling_worker.outages", "broker reachable again after 0s"),
        ("celery.worker.consumer.connection", "Connected to amqp://guest:**@host//"),
    ]
    end = caplog.records[2].getMessage()
    assert "1 beat entries not sent" in end and "4 reconnections" in end
    assert not any(r.exc_info for r in caplog.records)


def test_an_ack_lost_with_the_connection_is_one_plain_warning(caplog):
    outages.shape_broker_logs()
    try:
        raise ConnectionError("connection already closed")
    except ConnectionError:
        logging.getLogger("celery.worker.request").critical("Couldn't ack %r, reason:%r", 7, "closed", exc_info=True)
    (record,) = caplog.records
    assert record.levelname == "WARNING" and not record.exc_info
    assert (
        record.getMessage()
        == "Couldn't ack 7, reason:'closed' (the broker delivers its message again; it finds its job handled)"
    )


def test_beat_is_back_when_a_send_is_not_followed_by_a_failure(caplog):
    caplog.set_level(logging.INFO)  # beat's "Sending due task" lines are INFO
    outages.shape_broker_logs(beat=True)
    beat = logging.getLogger("celery.beat")
    for _ in range(3):
        beat.info("Scheduler: Sending due task kling-sweep (kling.sweep)")
        beat.error("Message Error: Couldn't apply scheduled task kling-sweep: [Errno 111] Connection refused")
    beat.info("Scheduler: Sending due task kling-sweep (kling.sweep)")  # this one goes through
    assert [r.getMessage().split(" (")[0] for r in caplog.records if r.name == "kling_worker.outages"] == [
        "broker unreachable"
    ]
    beat.info("Scheduler: Sending due task kling-sweep (kling.sweep)")
    lines = [r.getMessage() for r in caplog.records if r.name == "kling_worker.outages"]
    assert len(lines) == 2 and lines[1].startswith("broker reachable again") and "3 beat entries not sent" in lines[1]
    assert "beat cannot send the sweep" in lines[0]
    assert len(logging.getLogger("celery.beat").filters) == 1  # replaced, not added


# -- exact lines, events and edges -------------------------------------------------------

WORKER_MEANWHILE = (
    "running tasks finish (their acks are lost; the broker delivers those messages again and they find "
    "their jobs handled), polls go on from this worker's timer, and the worker reconnects every few seconds"
)
BEAT_MEANWHILE = "beat cannot send the sweep; the first sweep sent afterwards catches up"


class Clock:
    """Stands in for the time module in worker.ops.outages: monotonic() returns `now`."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def monotonic(self) -> float:
        return self.now


def records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "kling_worker.outages"]


def test_each_outage_line_has_its_event(caplog, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(outages, "time", clock)
    outage = outages.database()
    outage.defer("messages", failure())
    clock.now += outages.SUMMARY_EVERY
    outage.still(failure("still refused"))
    clock.now += 1
    outage.ok(clock.now)
    start, summary, end = records(caplog)
    assert [r.__dict__.get("event") for r in (start, summary, end)] == [
        "outage_started",
        "outage_continues",
        "outage_ended",
    ]
    assert summary.getMessage() == (
        "database still unreachable after 30s (Exception: still refused); "
        "put off meanwhile: 1 messages; answers from Modellix held in memory now: 0"
    )


def test_a_summary_comes_exactly_every_summary_every_seconds(caplog, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(outages, "time", clock)
    outage = outages.database()
    outage.defer("polls", failure())
    clock.now += outages.SUMMARY_EVERY - 0.001
    outage.still(failure())
    assert len(records(caplog)) == 1  # not yet
    clock.now += 0.001
    outage.still(failure())
    assert len(records(caplog)) == 2  # at SUMMARY_EVERY exactly
    clock.now += outages.SUMMARY_EVERY - 0.001
    outage.still(failure())
    assert len(records(caplog)) == 2  # counted from the last summary, not from the start


def test_answers_held_are_counted_up_and_down(caplog):
    outage = outages.database()
    outage.defer("polls", failure())
    for change in (+1, +1, +1, -1):
        outage.holding(change)
    outage.ok(time.monotonic())
    assert (
        records(caplog)[-1]
        .getMessage()
        .endswith("; put off meanwhile: 1 polls; answers from Modellix held in memory now: 2")
    )


def test_an_outage_without_work_put_off_says_nothing_and_a_broker_holds_no_answers(caplog):
    outage = outages.broker()
    outage.still("refused")
    outage.ok(time.monotonic())
    start, end = (r.getMessage() for r in records(caplog))
    assert start == f"broker unreachable (refused); meanwhile {WORKER_MEANWHILE}"
    assert end == "broker reachable again after 0s; put off meanwhile: nothing"


def test_what_the_broker_outage_says_happens_meanwhile():
    assert outages.broker().meanwhile == WORKER_MEANWHILE
    assert outages.broker(beat=False).meanwhile == WORKER_MEANWHILE
    assert outages.broker(beat=True).meanwhile == BEAT_MEANWHILE
    assert not outages.broker().holds_answers and outages.database().holds_answers


def record(name: str, text: str, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, text, None, exc_info)


def test_the_consumers_connected_line_passes_and_ends_the_outage():
    outage = outages.broker()
    shape = outages.BrokerLogShape(outage)
    outage.still("refused")
    assert shape.filter(record("celery.worker.consumer.connection", "Connected to amqp://guest:**@host//")) is True
    assert not outage.down


def test_beats_sending_lines_pass():
    shape = outages.BrokerLogShape(outages.broker(beat=True))
    assert shape.filter(record("celery.beat", "Scheduler: Sending due task kling-sweep (kling.sweep)")) is True


@pytest.mark.parametrize("verb", ["ack", "reject"])
def test_an_ack_or_reject_lost_is_a_warning_named_ack_lost(verb):
    shape = outages.BrokerLogShape(outages.broker())
    line = record("celery.worker.request", f"Couldn't {verb} 7, reason:'closed'")
    assert shape.filter(line) is True
    assert line.levelname == "WARNING" and line.__dict__["event"] == "ack_lost"
    assert line.getMessage() == (
        f"Couldn't {verb} 7, reason:'closed' (the broker delivers its message again; it finds its job handled)"
    )


def test_a_broker_line_with_an_exception_names_the_exception_as_the_cause(caplog):
    outage = outages.broker()
    shape = outages.BrokerLogShape(outage)
    # An exception logged without being raised has no traceback: still the cause.
    error = ConnectionRefusedError(111, "Connection refused")
    line = record(
        "celery.worker.consumer.consumer",
        "consumer: Cannot connect to amqp://host//: retrying",
        (
            ConnectionRefusedError,
            error,
            None,
        ),
    )
    assert shape.filter(line) is False
    assert (
        records(caplog)[0]
        .getMessage()
        .startswith("broker unreachable (ConnectionRefusedError: [Errno 111] Connection refused); meanwhile")
    )


def test_shape_broker_logs_installs_a_workers_shape_on_each_broker_logger():
    loggers = [logging.getLogger(name) for name in (*outages.BROKER_LOGGERS, "")]
    before = [list(found.filters) for found in loggers]
    try:
        outages.shape_broker_logs()
        for found in loggers[:-1]:
            (shape,) = [f for f in found.filters if isinstance(f, outages.BrokerLogShape)]
            assert shape.outage.meanwhile == WORKER_MEANWHILE
        assert not [f for f in logging.getLogger().filters if isinstance(f, outages.BrokerLogShape)]
    finally:  # the filters as they were
        for found, filters in zip(loggers, before, strict=True):
            found.filters[:] = filters


@pytest.mark.parametrize(
    "exc, text",
    [
        ("x" * 300, "x" * 200),
        (Exception("y" * 300 + "\nsecond line"), "Exception: " + "y" * 200),
        (Exception(), "Exception: "),
        (Exception("  \n"), "Exception: "),
    ],
)
def test_a_reason_is_the_first_line_cut_at_200_characters(exc, text):
    assert outages.reason(exc) == text
