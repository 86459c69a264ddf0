"""The line's order: tenants by weight, caps per tenant, priority with aging, cancels and retries; the rule
on its own, then the claim on SQLite here and on PostgreSQL in tests/services/test_share.py."""

from __future__ import annotations

import time
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import update

from models import JobStatus, budget, lifecycle, store, tenants
from models.db import make_engine, transaction
from models.job import Job, utcnow
from models.tenants import Waiting
from worker.fleet import share
from worker.fleet.slots import HEADROOM


def waiting(name: str, **values) -> Waiting:
    fields = {"weight": 1.0, "max_in_flight": None, "max_rps": None, "vtime": 0.0, "next_slot": 0.0}
    fields.update(in_flight=0)
    fields.update(values)
    return Waiting(name=name, **fields)


def run_turns(tenants_: dict[str, Waiting], turns: int, clock: float = 0.0) -> Counter[str]:
    """Give `turns` turns among always-backlogged tenants, moving their virtual times as the claim does."""
    given: Counter[str] = Counter()
    for _ in range(turns):
        turn = share.choose(list(tenants_.values()), clock, now=1000.0)
        assert turn is not None
        given[turn.tenant] += 1
        clock = turn.clock
        tenants_[turn.tenant] = waiting(turn.tenant, weight=tenants_[turn.tenant].weight, vtime=turn.vtime)
    return given


# -- the rule ---------------------------------------------------------------------------------


def test_a_tenant_alone_gets_every_turn():
    assert run_turns({"a": waiting("a", weight=0.1)}, 50) == {"a": 50}


def test_backlogged_tenants_share_the_turns_by_weight():
    given = run_turns({"batch": waiting("batch", weight=1.0), "web": waiting("web", weight=3.0)}, 400)
    assert given == {"web": 300, "batch": 100}


def test_equal_weights_alternate_whatever_the_names():
    given = run_turns({"z": waiting("z"), "a": waiting("a"), "m": waiting("m")}, 9)
    assert given == {"a": 3, "m": 3, "z": 3}


def test_a_tenant_back_from_idle_starts_from_the_clock_and_saves_no_burst():
    # "a" had the fleet to itself for 1,000 turns; "b" arrives with its virtual time at 0.
    turn = share.choose([waiting("a", vtime=1000.0), waiting("b", vtime=0.0)], clock=999.0, now=0.0)
    assert turn == share.Turn("b", clock=999.0, vtime=1000.0, next_slot=None)
    given = run_turns({"a": waiting("a", vtime=1000.0), "b": waiting("b", vtime=0.0)}, 10, clock=999.0)
    assert given == {"a": 5, "b": 5}


def test_a_turn_moves_the_clock_to_the_tenants_start_and_its_time_on_by_one_over_its_weight():
    turn = share.choose([waiting("a", weight=4.0, vtime=7.0)], clock=2.0, now=0.0)
    assert turn == share.Turn("a", clock=7.0, vtime=7.25, next_slot=None)


def test_a_tenant_at_its_in_flight_cap_is_passed_over():
    capped = waiting("a", max_in_flight=2, in_flight=2)
    assert not share.eligible(capped, now=0.0)
    assert share.eligible(waiting("a", max_in_flight=2, in_flight=1), now=0.0)
    turn = share.choose([capped, waiting("b", vtime=50.0)], clock=0.0, now=0.0)
    assert turn is not None and turn.tenant == "b"
    assert share.choose([capped], clock=0.0, now=0.0) is None


def test_a_tenant_before_its_own_rate_slot_is_passed_over_and_its_slot_moves_on():
    assert not share.eligible(waiting("a", max_rps=2.0, next_slot=100.5), now=100.0)
    assert share.eligible(waiting("a", max_rps=2.0, next_slot=100.0), now=100.0)
    turn = share.choose([waiting("a", max_rps=2.0, next_slot=90.0)], clock=0.0, now=100.0)
    assert turn is not None and turn.next_slot == pytest.approx(100.0 + HEADROOM / 2.0)
    # A slot booked ahead moves on from where it is, not from now.
    turn = share.choose([waiting("a", max_rps=2.0, next_slot=100.0)], clock=0.0, now=100.0)
    assert turn is not None and turn.next_slot == pytest.approx(100.0 + HEADROOM / 2.0)


def test_priority_is_a_bounded_shift_of_the_time_a_job_was_queued():
    aging = 60.0
    low = share.line_of(1000.0, 5, aging)
    assert low == 1000.0 - 300.0
    # A priority-9 job queued up to 4 x 60 s after a priority-5 one goes first; later than that, after.
    assert share.line_of(1000.0 + 239.0, 9, aging) < low
    assert share.line_of(1000.0 + 241.0, 9, aging) > low
    # Same priority: first come, first served.
    assert share.line_of(1000.0, 0, aging) < share.line_of(1000.001, 0, aging)


# -- the claim in the database ----------------------------------------------------------------


@pytest.fixture
def engine(any_db_url):
    eng = make_engine(any_db_url)
    yield eng
    eng.dispose()


def queue(engine, job_id: str, tenant: str = "default", priority: int = 5, *, ago: float = 0.0, **values) -> None:
    at = utcnow() - timedelta(seconds=ago)
    line = share.line_of(at.timestamp(), priority, 60.0)
    with transaction(engine) as s:
        created = lifecycle.create(
            s,
            job_id,
            JobStatus.queued,
            {"prompt": job_id},
            None,
            at,
            tenant=tenant,
            priority=priority,
            line=line,
            **values,
        )
        assert created


def take(engine) -> str | None:
    chosen: list[str] = []
    with transaction(engine) as s:
        taken = share.take_next(s, utcnow(), chosen)
    if taken is not None:
        assert chosen == [taken.job_id]
    return taken.job_id if taken else None


def take_all(engine) -> list[str]:
    order = []
    while (job_id := take(engine)) is not None:
        order.append(job_id)
    return order


def status_of(engine, job_id: str) -> str:
    with transaction(engine) as s:
        return store.get_job(s, job_id).status


def test_a_taken_job_is_submitting_with_its_attempt_counted_and_what_to_send(engine):
    queue(engine, "j1", "web", payload={"prompt": "j1", "image_list": [{"image": "data:image/png;base64,AAAA"}]})
    queue(engine, "j2", "web")
    with transaction(engine) as s:
        first = share.take_next(s, utcnow(), [])
        second = share.take_next(s, utcnow(), [])
    assert first == store.Taken(
        "j1", 1, {"prompt": "j1", "image_list": [{"image": "data:image/png;base64,AAAA"}]}, "web"
    )
    assert second == store.Taken("j2", 1, {"prompt": "j2"}, "web")
    assert status_of(engine, "j1") == status_of(engine, "j2") == JobStatus.submitting.value


def test_tenants_take_turns_whatever_was_queued_first(engine):
    for i in range(5):
        queue(engine, f"a{i}", "a", ago=100 - i)
    queue(engine, "b0", "b")
    queue(engine, "b1", "b")
    assert take_all(engine) == ["a0", "b0", "a1", "b1", "a2", "a3", "a4"]


def test_weights_set_by_an_operator_share_the_turns(engine):
    with transaction(engine) as s:
        tenants.set_policy(s, "web", utcnow(), weight=3.0)
    for i in range(12):
        queue(engine, f"batch{i:02}", "batch", ago=100 - i)
        queue(engine, f"web{i:02}", "web", ago=100 - i)
    first_eight = [job_id.rstrip("0123456789") for job_id in take_all(engine)[:8]]
    assert Counter(first_eight) == {"web": 6, "batch": 2}


def test_the_fair_clock_and_each_tenants_virtual_time_are_kept_while_tenants_compete(engine):
    with transaction(engine) as s:
        tenants.set_policy(s, "web", utcnow(), weight=2.0)
    queue(engine, "w1", "web", ago=4)
    queue(engine, "w2", "web", ago=3)
    queue(engine, "b1", "batch", ago=2)
    queue(engine, "b2", "batch", ago=1)
    assert take_all(engine) == ["b1", "w1", "w2", "b2"]  # ties go by name
    with transaction(engine) as s:
        # b1 at 0 (batch on to 1), w1 at 0 (web on to 0.5), w2 at 0.5 (web on to 1);
        # then batch alone: b2 is not recorded.
        assert budget.read(s).fair_clock == 0.5
        rows = {row.name: row for row in tenants.policies(s)}
    assert (rows["web"].vtime, rows["web"].weight) == (1.0, 2.0) and rows["batch"].vtime == 1.0


def test_a_tenant_alone_takes_its_turns_without_bookkeeping(engine):
    queue(engine, "a1", "a", ago=2)
    queue(engine, "a2", "a", ago=1)
    assert take_all(engine) == ["a1", "a2"]
    with transaction(engine) as s:
        assert budget.read(s).fair_clock == 0.0 and tenants.policies(s) == []


def test_a_tenant_at_its_in_flight_cap_waits_and_the_others_go(engine):
    with transaction(engine) as s:
        tenants.set_policy(s, "a", utcnow(), max_in_flight=1)
    queue(engine, "a1", "a", ago=10)
    queue(engine, "a2", "a", ago=9)
    queue(engine, "b1", "b", ago=1)
    assert take_all(engine) == ["a1", "b1"]
    with transaction(engine) as s:
        assert not share.ready(s, utcnow())
        lifecycle.move(s, "a1", JobStatus.failed, utcnow(), error_code="x", error_message="x")
        assert share.ready(s, utcnow())
    assert take_all(engine) == ["a2"]


def test_a_tenant_over_its_own_rate_waits_for_its_slot(engine):
    with transaction(engine) as s:
        tenants.set_policy(s, "a", utcnow(), max_rps=0.5)
    queue(engine, "a1", "a", ago=2)
    queue(engine, "a2", "a", ago=1)
    before = time.time()
    assert take_all(engine) == ["a1"]
    with transaction(engine) as s:
        row = next(r for r in tenants.policies(s) if r.name == "a")
        assert before + HEADROOM / 0.5 <= row.next_slot <= time.time() + HEADROOM / 0.5
        s.execute(update(tenants.tenants).values(next_slot=time.time() - 0.01))
    assert take_all(engine) == ["a2"]


def test_priority_orders_a_tenants_line_and_waiting_ages_a_job(engine):
    queue(engine, "old-low", "a", priority=0, ago=1000)  # 1,000 s of waiting: worth more than 9 steps
    queue(engine, "normal", "a", priority=5, ago=30)
    queue(engine, "urgent", "a", priority=9, ago=0)
    queue(engine, "late-low", "a", priority=0, ago=0)
    assert take_all(engine) == ["old-low", "urgent", "normal", "late-low"]


def test_a_jobs_place_in_line_counts_the_jobs_ahead_of_it_in_its_tenants_line(engine):
    queue(engine, "a1", "a", ago=3)
    queue(engine, "b1", "b", ago=2)
    queue(engine, "a2", "a", ago=1)
    queue(engine, "a0", "a", priority=9)
    with transaction(engine) as s:
        places = {j.id: store.place_in_line(s, j.tenant, j.line) for j in s.query(Job)}
    assert places == {"a0": 1, "a1": 2, "a2": 3, "b1": 1}


def test_a_cancelled_waiting_job_is_never_taken(engine):
    queue(engine, "keep", "a", ago=1)
    queue(engine, "drop", "a", ago=2)
    with transaction(engine) as s:
        assert lifecycle.cancel(s, "drop", utcnow())
    assert take_all(engine) == ["keep"]
    assert status_of(engine, "drop") == JobStatus.cancelled.value


def test_a_job_sent_back_waits_until_it_is_due_in_its_place(engine):
    queue(engine, "first", "a", ago=10)
    queue(engine, "second", "a", ago=5)
    assert take(engine) == "first"
    due = utcnow() + timedelta(seconds=30)
    with transaction(engine) as s:
        assert lifecycle.requeue(
            s, "first", utcnow(), refund=True, error_code="rate_limited", error_message="429", due_at=due
        )
    assert take_all(engine) == ["second"]
    with transaction(engine) as s:
        assert not share.ready(s, utcnow())
        assert share.ready(s, due)
        job = store.get_job(s, "first")
        assert (job.status, job.attempts, job.due_at) == (JobStatus.queued.value, 0, due)
    with transaction(engine) as s:
        taken = share.take_next(s, due, [])
    assert taken is not None and (taken.job_id, taken.attempt) == ("first", 1)
    with transaction(engine) as s:
        assert store.get_job(s, "first").due_at is None


def test_an_empty_line_takes_nothing_and_moves_nothing(engine):
    queue(engine, "done", "a")
    with transaction(engine) as s:
        lifecycle.cancel(s, "done", utcnow())
        assert not share.ready(s, utcnow())
        assert share.take_next(s, utcnow(), []) is None
        assert budget.read(s).fair_clock == 0.0
        assert tenants.policies(s) == []
