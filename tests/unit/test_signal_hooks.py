"""What the service's Celery signal hooks do (worker.wiring.signals) and what they call in worker.wiring.app
and worker.ops.metrics: a process's folders and broker log shape at start, the reconnection warning
quieted once ready, the tasks in flight, the stop. The health server's hooks: tests/unit/test_health.py."""

from __future__ import annotations

import logging
import threading
import time
import uuid
import warnings
from types import SimpleNamespace

import pytest
from celery.exceptions import CPendingDeprecationWarning
from celery.worker.consumer.consumer import CANCEL_TASKS_BY_DEFAULT
from prometheus_client import REGISTRY
from sqlalchemy import update

from models import ApiBudget, JobStatus, lifecycle, store
from models.job import utcnow
from worker import resources, submission
from worker.fleet.waiting import OverBudget
from worker.ops import metrics, outages
from worker.wiring import app as wiring_app
from worker.wiring import signals as hooks

BROKER_FOLDERS = ["bad", "control", "processed", "queue", "unacked"]


@pytest.fixture
def broker_loggers():
    """The broker loggers' filters as they were before the test."""
    saved = {name: list(logging.getLogger(name).filters) for name in outages.BROKER_LOGGERS}
    yield
    for name, filters in saved.items():
        logging.getLogger(name).filters = filters


def shapes() -> list[outages.BrokerLogShape]:
    """The BrokerLogShape of each broker logger, in BROKER_LOGGERS' order (one each, or the test fails)."""
    found = []
    for name in outages.BROKER_LOGGERS:
        [shape] = [f for f in logging.getLogger(name).filters if isinstance(f, outages.BrokerLogShape)]
        found.append(shape)
    return found


@pytest.fixture
def home(monkeypatch, tmp_path):
    """KLING_HOME two folders below the test's own, none of them there yet."""
    folder = tmp_path / "not-yet" / "home"
    monkeypatch.setenv("KLING_HOME", str(folder))
    return folder


@pytest.fixture
def embedded_default(monkeypatch):
    monkeypatch.setattr(wiring_app, "cfg", SimpleNamespace(broker_url="filesystem://localhost/"))


# -- a process starts -------------------------------------------------------------------


def test_a_starting_worker_makes_its_home_and_the_broker_folders_and_shapes_broker_logs(
    home, embedded_default, broker_loggers
):
    wiring_app.prepare_process()
    assert sorted(p.name for p in (home / "broker").iterdir()) == BROKER_FOLDERS
    found = shapes()
    assert all(shape is found[0] for shape in found)  # one outage for all of the process's broker loggers
    assert found[0].outage.name == "broker"
    assert found[0].outage.meanwhile == outages.broker(beat=False).meanwhile


def test_preparing_again_keeps_the_folders_and_replaces_the_log_shape(home, embedded_default, broker_loggers):
    wiring_app.prepare_process()
    first = shapes()[0]
    (home / "broker" / "queue" / "kept.msg").write_text("{}")
    wiring_app.prepare_process(beat=True)
    assert (home / "broker" / "queue" / "kept.msg").read_text() == "{}"
    again = shapes()
    assert again[0] is not first and all(shape is again[0] for shape in again)
    assert again[0].outage.meanwhile == outages.broker(beat=True).meanwhile


def test_with_another_broker_only_the_home_is_made(home, monkeypatch, broker_loggers):
    monkeypatch.setattr(wiring_app, "cfg", SimpleNamespace(broker_url="amqp://kling@127.0.0.1:5672//"))
    wiring_app.prepare_process()
    assert home.is_dir() and list(home.iterdir()) == []
    assert shapes()[0].outage.meanwhile == outages.broker(beat=False).meanwhile


def test_the_worker_and_beat_hooks_prepare_their_own_kind_of_process(home, embedded_default, broker_loggers):
    hooks._started(sender="celery@host", conf=None, options={})
    assert sorted(p.name for p in (home / "broker").iterdir()) == BROKER_FOLDERS
    assert shapes()[0].outage.meanwhile == outages.broker(beat=False).meanwhile
    hooks._beat_started(sender=object())
    assert shapes()[0].outage.meanwhile == outages.broker(beat=True).meanwhile
    assert outages.broker(beat=True).meanwhile != outages.broker(beat=False).meanwhile


# -- ready: the reconnection warning ------------------------------------------------------


@pytest.mark.parametrize("quiet", [wiring_app.quiet_reconnection_warnings, hooks._ready], ids=["app", "hook"])
def test_once_ready_celerys_reconnection_warning_is_ignored_and_no_other(quiet):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet()
        warnings.warn(CANCEL_TASKS_BY_DEFAULT, CPendingDeprecationWarning, stacklevel=1)
        warnings.warn("another change", CPendingDeprecationWarning, stacklevel=1)
        warnings.warn(CANCEL_TASKS_BY_DEFAULT, UserWarning, stacklevel=1)
        warnings.warn("x" + CANCEL_TASKS_BY_DEFAULT, CPendingDeprecationWarning, stacklevel=1)
    assert [(w.category, str(w.message)) for w in seen] == [
        (CPendingDeprecationWarning, "another change"),
        (UserWarning, CANCEL_TASKS_BY_DEFAULT),
        (CPendingDeprecationWarning, "x" + CANCEL_TASKS_BY_DEFAULT),
    ]


# -- tasks in flight ---------------------------------------------------------------------


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


def counts(name: str) -> tuple[float | None, float | None]:
    """kling_tasks_in_flight and kling_task_runs_total for a task (None: no series)."""
    return (
        REGISTRY.get_sample_value("kling_tasks_in_flight", {"task": name}),
        REGISTRY.get_sample_value("kling_task_runs_total", {"task": name}),
    )


def test_known_tasks_show_at_zero_before_any_ran(task_names):
    first, second, other = task_names(), task_names(), task_names()
    assert counts(first) == (None, None)
    metrics.tasks_known(name for name in (first, second))
    assert (counts(first), counts(second), counts(other)) == ((0.0, 0.0), (0.0, 0.0), (None, None))


def test_a_task_is_in_flight_while_it_runs_and_each_run_is_counted(task_names):
    name, other = task_names(), task_names()
    metrics.task_started(name)
    metrics.task_started(name)
    assert counts(name) == (2.0, 2.0)
    metrics.task_ended(name)
    assert counts(name) == (1.0, 2.0)
    metrics.task_ended(name)
    assert counts(name) == (0.0, 2.0)
    assert counts(other) == (None, None)


def test_the_task_hooks_count_the_task_celery_runs(task_names):
    name = task_names()
    task = SimpleNamespace(name=name)
    hooks._task_started(sender=task, task_id="celery-1", task=task, args=(), kwargs={})
    assert counts(name) == (1.0, 1.0)
    hooks._task_ended(sender=task, task_id="celery-1", task=task, args=(), kwargs={}, retval=None, state="SUCCESS")
    assert counts(name) == (0.0, 1.0)


# -- the worker stops -----------------------------------------------------------------------


def test_stopping_sets_the_flag_and_ends_the_takers_wait_for_its_turn(sqlite_url, configure):
    configure(DATABASE_URL=sqlite_url, MODELLIX_MAX_RPS="1")
    res = resources.get()
    with res.transaction() as s:
        s.execute(update(ApiBudget).values(next_slot=time.time() + 120))  # the next two minutes are booked
        lifecycle.create(s, "waiting", JobStatus.queued, {"prompt": "x"}, None, utcnow())
    ended: list[BaseException] = []

    def take() -> None:
        try:
            submission.take_next(res)
        except OverBudget as over:
            ended.append(over)

    taker = threading.Thread(target=take)
    taker.start()
    time.sleep(0.5)
    assert taker.is_alive()  # waiting for its turn
    stopped = time.monotonic()
    hooks._stopping(sender="celery@host", sig="SIGTERM", how="Warm", exitcode=0)
    taker.join(10)
    assert not taker.is_alive() and time.monotonic() - stopped < 1.0
    assert [str(e) for e in ended] == ["over the API budget (the worker is stopping); retry in 0.0s"]
    assert res.stopping.is_set()
    with res.transaction() as s:
        assert (store.get_job(s, "waiting").status, store.get_job(s, "waiting").attempts) == ("queued", 0)


def test_at_shutdown_this_process_hands_its_polls_over(configure, monkeypatch):
    from worker.wiring import tasks

    given: list[resources.Resources] = []
    monkeypatch.setattr(tasks, "hand_over", lambda res: given.append(res) or 0)
    configure()
    hooks._hand_over(sender="celery@host")
    assert given == [resources.get()]
