"""A worker process's health server (worker.ops.health) in this process: /healthz and /readyz over real
HTTP on an ephemeral port, the checks behind them, and the server started and stopped as a worker's
signal hooks do. The scrape's contents: tests/unit/test_metrics.py; a real worker: tests/e2e/test_metrics.py."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from celery import Celery, bootsteps
from prometheus_client import REGISTRY

from tests.support.jobs import wait_for
from tests.support.metrics import scrape, value
from worker import resources
from worker.ops import health, metrics

# -- helpers ------------------------------------------------------------------------------


def ask(port: int, path: str) -> tuple[int, str, list[tuple[str, str]], bytes]:
    """Status, reason phrase, headers (as sent, case kept) and body of one GET."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        answer = conn.getresponse()
        return answer.status, answer.reason, answer.getheaders(), answer.read()
    finally:
        conn.close()


def answered(port: int, path: str) -> tuple[int, dict]:
    status, _, _, body = ask(port, path)
    return status, json.loads(body)


def quiet_snapshot() -> metrics.Snapshot:
    return metrics.Snapshot(pause=lambda: (0.0, ""), poller_backlog=lambda: 0, read_backlog=list)


@pytest.fixture
def serve():
    """Starts HealthServers on 127.0.0.1 and an ephemeral port; stops them afterwards."""
    started: list[health.HealthServer] = []

    def start(live=lambda: None, ready=dict) -> health.HealthServer:
        server = health.HealthServer(0, live, ready, quiet_snapshot(), address="127.0.0.1").start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


class Consumer(SimpleNamespace):
    """What health reads of Celery's consumer (worker_ready's sender)."""


def consumer(app=None, state=bootsteps.RUN, connection: object | None = "a connection") -> Consumer:
    return Consumer(app=app, blueprint=SimpleNamespace(state=state), connection=connection)


def embedded_app(folder: Path, tasks: list[str]) -> SimpleNamespace:
    conf = SimpleNamespace(broker_transport_options={"data_folder_in": str(folder)})
    return SimpleNamespace(tasks={name: object() for name in tasks}, conf=conf)


@pytest.fixture
def task_names():
    """Unique task names; their series are removed from the registry afterwards."""
    made: list[str] = []

    def make() -> str:
        made.append(f"kling.test-{uuid.uuid4().hex[:8]}")
        return made[-1]

    yield make
    for name in made:
        for family in (metrics.TASKS_IN_FLIGHT, metrics.TASK_RUNS):
            try:
                family.remove(name)
            except KeyError:
                pass  # never made: nothing to remove


@pytest.fixture
def process_server(monkeypatch):
    """health's per-process server: none before the test, none left after it."""
    monkeypatch.setattr(health, "_running", None)
    yield
    health.stop()


def refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the answers ----------------------------------------------------------------------------


def test_healthz_is_200_with_a_json_body_while_live(serve):
    server = serve(live=lambda: None)
    status, reason, headers, body = ask(server.port, "/healthz")
    assert (status, reason, body) == (200, "OK", b'{"status": "ok"}')
    assert ("Content-Type", "application/json") in headers
    assert ("Content-Length", str(len(body))) in headers


def test_healthz_is_503_with_the_reason_when_not_live(serve):
    server = serve(live=lambda: "the worker is stopping")
    status, reason, headers, body = ask(server.port, "/healthz")
    assert (status, reason) == (503, "Service Unavailable")
    assert json.loads(body) == {"status": "failing", "reason": "the worker is stopping"}
    assert ("Content-Type", "application/json") in headers
    assert ("Content-Length", str(len(body))) in headers


def test_readyz_names_each_dependency_and_why_it_is_not_ready(serve):
    problems: dict[str, str | None] = {"broker": None, "database": None}
    server = serve(ready=lambda: dict(problems))
    status, reason, headers, body = ask(server.port, "/readyz")
    assert (status, reason) == (200, "OK")
    assert json.loads(body) == {"status": "ok", "broker": "ok", "database": "ok"}
    assert list(json.loads(body)) == ["status", "broker", "database"]
    assert ("Content-Type", "application/json") in headers

    problems["database"] = "cannot connect: OperationalError: unable to open database file"
    status, reason, headers, body = ask(server.port, "/readyz")
    assert (status, reason) == (503, "Service Unavailable")
    assert json.loads(body) == {
        "status": "unavailable",
        "broker": "ok",
        "database": "cannot connect: OperationalError: unable to open database file",
    }
    assert ("Content-Length", str(len(body))) in headers


def test_other_paths_are_404_naming_what_is_served(serve):
    server = serve()
    status, _, headers, body = ask(server.port, "/")
    assert status == 404
    assert body == b"not found: /metrics, /healthz and /readyz are served here\n"
    assert ("Content-Type", "text/plain; charset=utf-8") in headers


# -- liveness: consuming --------------------------------------------------------------------


@pytest.fixture
def res(configure):
    configure(KLING_CONCURRENCY="2")
    return resources.get()


def test_a_consuming_process_is_live_with_or_without_a_poll_timer(res):
    assert res.poller_if_started is None
    assert health.consuming(res, consumer()) is None
    assert res.poller.alive()
    assert health.consuming(res, consumer()) is None


@pytest.mark.parametrize("state", [bootsteps.CLOSE, bootsteps.TERMINATE, 0])
def test_a_consumer_that_is_not_running_is_not_live(res, state):
    assert health.consuming(res, consumer(state=state)) == "Celery's consumer is not running"


def test_a_consumer_without_a_connection_is_reconnecting(res):
    assert health.consuming(res, consumer(connection=None)) == "no connection to the broker: reconnecting"


def test_a_stopped_poll_timer_is_not_live(res):
    poller = res.poller
    poller.stop()
    wait_for(lambda: not poller.alive(), 10, "the poll timer's thread ended")
    assert health.consuming(res, consumer()) == "the poll timer's thread has stopped"


def test_stopping_comes_first_then_the_consumer_then_its_connection(res):
    res.poller.stop()
    wait_for(lambda: not res.poller.alive(), 10, "the poll timer's thread ended")
    everything_wrong = consumer(state=bootsteps.CLOSE, connection=None)
    assert health.consuming(res, everything_wrong) == "Celery's consumer is not running"
    assert health.consuming(res, consumer(connection=None)) == "no connection to the broker: reconnecting"
    res.stopping.set()
    assert health.consuming(res, everything_wrong) == "the worker is stopping"


def test_the_poll_timer_backlog_is_what_it_has_scheduled(res):
    assert health._poller_backlog(res) == 0
    assert res.poller_if_started is None  # asking started nothing
    for _ in range(3):
        res.poller.schedule(3600, print)
    assert health._poller_backlog(res) == 3


# -- readiness: the broker and the database -----------------------------------------------


class FakeBrokerApp:
    """An app whose broker connection records how it was asked for, and fails with `error`."""

    def __init__(self, options: dict | None, error: Exception | None = None):
        self.conf = SimpleNamespace(broker_transport_options=options)
        self.error = error
        self.calls: list[tuple] = []

    @contextmanager
    def connection_for_read(self, **kwargs):
        self.calls.append(("connect", kwargs))
        try:
            yield self
        finally:
            self.calls.append(("released",))

    def ensure_connection(self, **kwargs) -> None:
        self.calls.append(("ensure", kwargs))
        if self.error is not None:
            raise self.error


def test_the_embedded_broker_is_ready_when_its_folder_is_there(tmp_path):
    app = FakeBrokerApp({"data_folder_in": str(tmp_path)})
    assert health.broker_problem(app) is None
    missing = tmp_path / "gone"
    app = FakeBrokerApp({"data_folder_in": str(missing)})
    assert health.broker_problem(app) == f"the embedded broker's folder {missing} is missing"
    assert app.calls == []  # a folder: nothing to connect to


@pytest.mark.parametrize("options", [None, {}, {"polling_interval": 0.2}])
def test_another_broker_gets_one_connection_one_try_with_the_probe_timeout(options):
    app = FakeBrokerApp(options)
    assert health.broker_problem(app) is None
    assert app.calls == [("connect", {"connect_timeout": 2.0}), ("ensure", {"max_retries": 0}), ("released",)]
    assert health.PROBE_TIMEOUT == 2.0


def test_a_broker_that_refuses_is_named_with_the_reason():
    app = FakeBrokerApp({}, error=ConnectionRefusedError(111, "Connection refused"))
    assert health.broker_problem(app) == "cannot connect: ConnectionRefusedError: [Errno 111] Connection refused"
    assert app.calls[-1] == ("released",)


def test_a_real_broker_connection_is_probed():
    assert health.broker_problem(Celery("probe", broker="memory://", set_as_current=False)) is None
    refused = Celery("probe", broker=f"amqp://guest:guest@127.0.0.1:{refused_port()}//", set_as_current=False)
    assert health.broker_problem(refused) == "cannot connect: OperationalError: [Errno 111] Connection refused"


def test_the_database_is_ready_when_a_fresh_connection_runs_a_statement(sqlite_url, tmp_path):
    assert health.database_problem(health.probe_engine(sqlite_url)) is None
    missing = health.probe_engine(f"sqlite:///{tmp_path / 'no-such-folder' / 'jobs.sqlite'}")
    assert health.database_problem(missing) == "cannot connect: OperationalError: unable to open database file"


# -- this worker process's server ---------------------------------------------------------


def test_a_worker_serves_health_on_its_port_until_it_stops(
    configure, sqlite_url, tmp_path, caplog, task_names, process_server
):
    queue = tmp_path / "queue"
    queue.mkdir()
    configure(DATABASE_URL=sqlite_url, KLING_METRICS_PORT="0", KLING_CONCURRENCY="2")
    res = resources.get()
    ours, theirs = task_names(), "celery.backend_cleanup"
    sender = consumer(app=embedded_app(queue, [ours, theirs]))
    with caplog.at_level(logging.INFO, logger="kling_worker.health"):
        server = health.start(res, sender)
    assert server is not None and health._running is server
    assert [r.getMessage() for r in caplog.records if r.name == "kling_worker.health"] == [
        f"metrics and health on http://0.0.0.0:{server.port} (/metrics, /healthz, /readyz)"
    ]
    assert health.start(res, sender) is server  # started once per process
    port = server.port

    assert answered(port, "/healthz") == (200, {"status": "ok"})
    assert answered(port, "/readyz") == (200, {"status": "ok", "broker": "ok", "database": "ok"})
    for _ in range(2):
        res.poller.schedule(3600, print)
    samples = scrape(port)
    assert value(samples, "kling_poller_backlog") == 2
    assert value(samples, "kling_tasks_in_flight", task=ours) == 0
    assert value(samples, "kling_task_runs_total", task=ours) == 0
    assert value(samples, "kling_scrape_errors_total") == 0
    assert REGISTRY.get_sample_value("kling_tasks_in_flight", {"task": theirs}) is None  # only kling.* tasks

    res.stopping.set()
    assert answered(port, "/healthz") == (503, {"status": "failing", "reason": "the worker is stopping"})

    health.stop()
    assert health._running is None
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    health.stop()  # nothing left to stop
    assert health._running is None


def test_readiness_names_a_missing_broker_folder_and_an_unreachable_database(
    configure, tmp_path, task_names, process_server
):
    database = tmp_path / "no-such-folder" / "jobs.sqlite"
    configure(DATABASE_URL=f"sqlite:///{database}", KLING_METRICS_PORT="0")
    res = resources.get()
    server = health.start(res, consumer(app=embedded_app(tmp_path / "no-queue", [task_names()])))
    assert server is not None
    assert answered(server.port, "/readyz") == (
        503,
        {
            "status": "unavailable",
            "broker": f"the embedded broker's folder {tmp_path / 'no-queue'} is missing",
            "database": "cannot connect: OperationalError: unable to open database file",
        },
    )
    assert answered(server.port, "/healthz") == (200, {"status": "ok"})  # live all the same
    assert value(scrape(server.port), "kling_scrape_errors_total") == 1  # the outbox backlog could not be read


def test_a_port_that_cannot_be_opened_is_logged_and_nothing_is_served(
    configure, tmp_path, caplog, task_names, process_server
):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        configure(KLING_METRICS_PORT=str(port))
        with caplog.at_level(logging.INFO, logger="kling_worker.health"):
            assert health.start(resources.get(), consumer(app=embedded_app(tmp_path, [task_names()]))) is None
    assert health._running is None
    [line] = [r for r in caplog.records if r.name == "kling_worker.health"]
    assert line.levelno == logging.ERROR
    assert line.getMessage().startswith(f"metrics and health not served: KLING_METRICS_PORT={port} cannot be opened (")


def test_the_worker_ready_hook_serves_this_process_health_and_the_shutdown_hook_stops_it(
    configure, sqlite_url, tmp_path, task_names, process_server
):
    from worker.wiring import signals as hooks

    configure(DATABASE_URL=sqlite_url, KLING_METRICS_PORT="0")
    sender = consumer(app=embedded_app(tmp_path, [task_names()]))
    hooks._serve_health(sender=sender)
    server = health._running
    assert server is not None
    assert answered(server.port, "/healthz") == (200, {"status": "ok"})
    sender.connection = None  # the consumer the hook was given is the one /healthz asks
    assert answered(server.port, "/healthz") == (
        503,
        {"status": "failing", "reason": "no connection to the broker: reconnecting"},
    )
    resources.get().stopping.set()  # and so are this process's resources
    assert answered(server.port, "/healthz") == (503, {"status": "failing", "reason": "the worker is stopping"})

    hooks._stop_health(sender="celery@host")
    assert health._running is None
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5)
