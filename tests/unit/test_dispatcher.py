"""A worker process's submit threads (worker.wiring.dispatcher) in this process, against the sandbox, on
SQLite here and on PostgreSQL in tests/services/test_dispatcher.py."""

from __future__ import annotations

import threading
import time

import pytest

from models import JobStatus, tenants
from models.job import utcnow
from tests.support.jobs import job, wait_for
from worker import resources, submission
from worker.wiring import dispatcher


class Recorder:
    """What the dispatcher hands on after each send (worker.wiring.tasks.carry_on in a worker)."""

    def __init__(self) -> None:
        self.outcomes: list[submission.Outcome] = []
        self._lock = threading.Lock()

    def __call__(self, res, outcome: submission.Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def sent(self) -> dict[str, JobStatus | None]:
        with self._lock:
            return {o.job_id: o.status for o in self.outcomes}


@pytest.fixture
def running(service):
    after = Recorder()
    found = dispatcher.start(resources.get(), after)
    yield found, after
    dispatcher.stop(5.0)


def queue(job_id: str, **kwargs) -> None:
    message = {"request": {"prompt": job_id}, "job_id": job_id, **kwargs}
    assert submission.handle(resources.get(), (), message, "m").status is JobStatus.queued


def test_a_queued_job_is_taken_and_sent_once_its_process_nudges(running, service):
    taker, after = running
    queue("j1", tenant="web")
    dispatcher.nudge()
    wait_for(lambda: after.sent().get("j1"), 5, "j1 sent")
    assert after.sent() == {"j1": JobStatus.submitted}
    outcome = after.outcomes[0]
    assert isinstance(outcome.next_step, submission.Follow)  # the worker polls it from here
    row = job("j1")
    assert (row.status, row.attempts, row.tenant) == ("submitted", 1, "web") and row.modellix_task_id
    assert service.stats()["submits"] == 1


def test_a_job_queued_by_another_process_is_found_without_a_nudge(running, service):
    _, after = running
    time.sleep(0.5)  # the taker is idle, looking at the table every IDLE seconds
    started = time.monotonic()
    queue("elsewhere")  # as another worker's message would: no nudge reaches this process
    wait_for(lambda: after.sent().get("elsewhere"), 5, "elsewhere sent")
    assert time.monotonic() - started < dispatcher.IDLE[1] + 2.0


def test_every_job_of_a_backlog_is_sent_once_across_tenants(running, service):
    _, after = running
    for i in range(30):
        queue(f"j{i:02}", tenant=("a", "b", "c")[i % 3], priority=i % 10)
    dispatcher.nudge()
    wait_for(lambda: len(after.sent()) == 30, 20, "30 jobs sent")
    assert set(after.sent().values()) == {JobStatus.submitted}
    assert len(after.outcomes) == 30 and service.stats()["submits"] == 30
    assert service.stats()["duplicate_prompts"] == 0


def test_a_tenant_at_its_cap_waits_while_the_others_go(running, service, configure):
    _, after = running
    with resources.get().transaction() as s:
        tenants.set_policy(s, "capped", utcnow(), max_in_flight=1)
    for i in range(3):
        queue(f"c{i}", tenant="capped")
    queue("free", tenant="open")
    dispatcher.nudge()
    wait_for(lambda: {"c0", "free"} <= set(after.sent()), 5, "c0 and free sent")
    time.sleep(0.5)  # the sandbox's tasks run for 0.5 s, but no poll ends them here: c0 stays in flight
    assert set(after.sent()) == {"c0", "free"}
    assert job("c1").status == job("c2").status == "queued"


def test_stopping_ends_the_taker_and_lets_the_sends_in_progress_finish(service):
    after = Recorder()
    service.set_faults(latency=0.5)  # each submit takes half a second
    taker = dispatcher.start(resources.get(), after)
    for i in range(3):
        queue(f"s{i}")
    dispatcher.nudge()
    wait_for(lambda: service.stats()["requests"] >= 1, 5, "a submit under way")
    stopped = time.monotonic()
    dispatcher.stop(5.0)
    assert not taker.alive() and time.monotonic() - stopped < 3.0
    statuses = {job(f"s{i}").status for i in range(3)}
    assert "submitting" not in statuses  # every job taken was sent and recorded before the stop returned
    assert set(after.sent().values()) <= {JobStatus.submitted}
    assert len(after.sent()) == sum(1 for i in range(3) if job(f"s{i}").status == "submitted")
    dispatcher.nudge()  # a stopped dispatcher is gone: a nudge does nothing


def test_one_dispatcher_per_process(running):
    taker, _ = running
    assert dispatcher.start(resources.get(), Recorder()) is taker
