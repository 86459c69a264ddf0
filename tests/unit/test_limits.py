"""The fleet's API budget as one worker sees it: pauses, request slots, places in flight.

The same budget across several worker processes: test_fleet_limits.py.
"""

from __future__ import annotations

import threading
import time

import pytest

from models import JobStatus, lifecycle
from models.budget import lift_pause
from models.budget import read as budget_row
from models.job import utcnow
from tests.support.jobs import budget, due_in, handle, job, seconds_until, set_budget, submitted, take_and_send
from worker import resources, submission
from worker.dev.sandbox import Step
from worker.fleet import pause, places, slots, waiting
from worker.fleet.waiting import OverBudget
from worker.polling import tracking


def queue(job_id: str, **kwargs) -> None:
    """A message for `job_id`: its job recorded `queued` in the line (nothing sent yet)."""
    message = {"request": {"prompt": job_id}, "job_id": job_id, **kwargs}
    assert submission.handle(resources.get(), (), message, "m").status is JobStatus.queued


def turn_held_back() -> float:
    """This process's next turn ends without a job taken (its wait outlasts MAX_HOLD): after how long
    the taker looks again."""
    with pytest.raises(OverBudget) as over:
        take_and_send()
    return over.value.retry_in


def test_a_429_on_submit_pauses_the_fleet_and_holds_back_other_jobs(service, monkeypatch):
    monkeypatch.setattr(places, "MAX_HOLD", 5.0)  # shorter than the pause: the turn ends at once
    service.script(Step(429, on="submit", retry_after=8))
    first = handle(request={"prompt": "x"}, job_id="hit")
    assert first.status is JobStatus.queued and due_in("hit") >= 8
    paused = budget()
    assert 6 < paused["paused_for"] <= 8 and "429" in paused["pause_reason"]
    queue("held")
    assert turn_held_back() > 5
    assert service.stats()["requests"] == 1  # the second job never reached the API
    row = job("held")
    assert row.status == "queued" and row.attempts == 0  # waiting for the pause costs no attempt


@pytest.mark.parametrize("max_rps", [None, "50"])
def test_a_pause_set_by_another_worker_holds_this_one_back(service, configure, monkeypatch, max_rps):
    monkeypatch.setattr(places, "MAX_HOLD", 5.0)
    if max_rps:
        configure(MODELLIX_MAX_RPS=max_rps)
    set_budget(paused_until=time.time() + 30, pause_reason="429 from Modellix")  # another worker's write
    queue("held")
    assert turn_held_back() >= 25
    assert job("held").status == "queued" and service.stats()["requests"] == 0


def test_a_pause_written_after_this_worker_looked_is_seen_within_a_second(service, monkeypatch):
    monkeypatch.setattr(places, "MAX_HOLD", 5.0)
    submitted("before")  # this process has read the budget row and cached "no pause"
    set_budget(paused_until=time.time() + 30, pause_reason="429 from Modellix")
    time.sleep(pause.PAUSE_REFRESH + 0.1)
    queue("after")
    assert turn_held_back() >= 25
    assert service.stats()["submits"] == 1


def test_a_submit_over_the_rate_budget_waits_in_the_line_without_an_attempt(service, configure, monkeypatch):
    monkeypatch.setattr(places, "MAX_HOLD", 5.0)  # the slot is further off than one wait may last
    configure(MODELLIX_MAX_RPS="1")
    set_budget(next_slot=time.time() + 100)  # the fleet has booked the next 100 s of requests
    queue("later")
    assert 95 <= turn_held_back() <= 102
    row = job("later")
    assert row.status == "queued" and row.attempts == 0
    assert service.stats()["requests"] == 0


def test_a_full_fleet_keeps_the_job_waiting_in_the_line_unclaimed(service, configure, monkeypatch):
    monkeypatch.setattr(places, "MAX_HOLD", 0.5)  # then one wait for a place runs out
    configure(MODELLIX_MAX_IN_FLIGHT="1")
    assert handle(request={"prompt": "r"}, job_id="running", metadata={"m": 1}).status is JobStatus.submitted
    assert job("running").meta == {"m": 1}
    queue("waiting", metadata={"m": 2})
    started = time.monotonic()
    turn_held_back()
    assert 0.5 <= time.monotonic() - started < 2.0  # it waited for a place, then the taker looks again
    row = job("waiting")
    assert row.status == "queued" and row.attempts == 0 and row.meta == {"m": 2}
    assert service.stats()["submits"] == 1


def test_a_poll_over_the_rate_budget_is_given_back_and_rescheduled(service, configure):
    submitted("p")
    configure(MODELLIX_MAX_RPS="1")
    set_budget(next_slot=time.time() + 40)
    following = tracking.check(resources.get(), "p", 0)
    assert isinstance(following, tracking.PollAgain)
    assert following.poll.seq == 0 and 35 <= following.poll.delay <= 42  # the same poll, later
    row = job("p")
    assert row.polls == 0 and row.status == "submitted" and 35 <= seconds_until(row.next_poll_at) <= 42
    assert service.stats()["polls"] == 0


def test_requests_leave_evenly_spaced_at_the_rate_limit(service, configure):
    configure(MODELLIX_MAX_RPS="20")
    set_budget(next_slot=0.0)  # a slot booked long ago must not let a burst through now
    spacing = slots.HEADROOM / 20
    wall, started = time.time(), time.monotonic()
    for _ in range(6):
        slots.take_request_slot(resources.get())
    assert time.monotonic() - started >= 5 * spacing - 0.01
    with resources.get().transaction() as s:
        row = budget_row(s)
    assert row.next_slot >= wall + 6 * spacing - 0.01  # six slots booked from now on, the next one after them


def test_a_shorter_pause_never_cuts_a_longer_one(service):
    pause.pause_fleet(resources.get(), 30, "402 Payment Required")
    pause.pause_fleet(resources.get(), 5, "429 from Modellix")
    paused = budget()
    assert paused["paused_for"] > 25 and paused["pause_reason"] == "402 Payment Required"


def test_a_pause_that_ran_out_is_not_reported(service):
    set_budget(paused_until=time.time() - 1, pause_reason="429 from Modellix")
    paused = budget()
    assert paused["paused_for"] == 0 and paused["pause_reason"] is None


def test_a_waiting_job_takes_a_freed_place_at_once(service, configure):
    configure(MODELLIX_MAX_IN_FLIGHT="1")
    submitted("running")
    outcome: list[submission.Outcome] = []
    waiter = threading.Thread(target=lambda: outcome.append(handle(request={"prompt": "y"}, job_id="waiting")))
    started = time.monotonic()
    waiter.start()
    time.sleep(1.0)
    with resources.get().transaction() as ex:  # the running task ends
        lifecycle.succeed(ex, "running", utcnow(), result_urls=["https://r/0.png"], answer={})
    waiter.join(15)
    assert outcome and outcome[0].status is JobStatus.submitted  # it waited in place, not in the broker
    assert time.monotonic() - started < slots.MAX_SLEEP


def test_a_pause_for_credit_is_renewed_while_the_balance_is_empty_and_lifted_once_topped_up(service, monkeypatch):
    service.balance = 0
    out = handle(request={"prompt": "x"}, job_id="broke")
    # Held back for a recheck, not for the whole KLING_ACCOUNT_RETRY (30 s here).
    assert out.status is JobStatus.queued and 15 <= due_in("broke") < 20
    first = budget()
    assert first["paused_for"] > 20 and first["pause_reason"].startswith("402 ")
    until = _paused_until()
    monkeypatch.setattr(places, "MAX_HOLD", 1.0)  # one wait for the top-up runs out
    queue("held")
    assert 15 <= turn_held_back() < 17  # the pause has ~30 s left
    # Waiting for its turn, the taker asked for the balance itself (no paid submit to find out):
    # still no credit, so it renewed the pause, KLING_ACCOUNT_RETRY from then.
    assert [r["kind"] for r in service.requests_log()] == ["submit", "other"]
    renewed = _paused_until()
    assert renewed > until
    assert pause.watch_balance(resources.get()) is None  # asked a moment ago: not again before BALANCE_EVERY
    assert service.stats()["submits"] == 0 and service.stats()["requests"] == 2

    time.sleep(1.5)
    monkeypatch.setattr(pause, "BALANCE_EVERY", 0.0)
    assert pause.watch_balance(resources.get()) == "renewed"  # still no credit: paused KLING_ACCOUNT_RETRY from now
    assert _paused_until() > renewed + 1
    assert service.stats()["requests"] == 3

    service.balance = 12.5
    assert pause.watch_balance(resources.get()) == "resumed"
    assert budget()["paused_for"] == 0
    sent = take_and_send()  # "broke" is not due yet: "held" goes
    assert sent.job_id == "held" and sent.status is JobStatus.submitted


def _paused_until() -> float:
    with resources.get().transaction() as s:
        return float(budget_row(s).paused_until)


def test_the_balance_is_not_asked_during_other_pauses(service, monkeypatch):
    monkeypatch.setattr(pause, "BALANCE_EVERY", 0.0)
    pause.pause_fleet(resources.get(), 30, "429 from Modellix")
    assert pause.watch_balance(resources.get()) is None
    pause.pause_fleet(resources.get(), 60, "401 Unauthorized: invalid key")  # topping up cannot fix a key
    assert pause.watch_balance(resources.get()) is None
    assert service.stats()["requests"] == 0
    set_budget(paused_until=0)
    assert pause.watch_balance(resources.get()) is None  # nor without a pause


def test_lifting_a_pause_for_credit_leaves_a_pause_set_since_for_another_reason(service):
    pause.pause_fleet(resources.get(), 30, "402 Payment Required: insufficient balance")
    set_budget(pause_reason="429 from Modellix")  # another worker's 429 took the row since the balance was read
    with resources.get().transaction() as s:
        assert not lift_pause(s, "402 Payment Required: insufficient balance")
    assert budget()["paused_for"] > 20
    set_budget(pause_reason="402 Payment Required: insufficient balance")
    with resources.get().transaction() as s:
        assert lift_pause(s, "402 Payment Required: insufficient balance")
    assert budget()["paused_for"] == 0


def test_the_sweep_lifts_a_pause_for_credit(service, monkeypatch):
    from worker.wiring import tasks

    monkeypatch.setattr(pause, "BALANCE_EVERY", 0.0)
    pause.pause_fleet(resources.get(), 30, "402 Payment Required: insufficient balance")
    tasks.sweep()
    assert budget()["paused_for"] == 0


def test_a_submit_waiting_in_place_for_credit_learns_of_the_top_up_itself(service, monkeypatch):
    """No sweep runs here, as on a fleet whose every thread holds a submit waiting for credit: the
    waiting submit asks for the balance itself (at most every BALANCE_EVERY) and goes once it is positive."""
    monkeypatch.setattr(pause, "BALANCE_EVERY", 0.5)
    monkeypatch.setattr(places, "MAX_HOLD", 10.0)  # without the question, the wait would run out and send it back
    service.balance = 0
    pause.pause_fleet(resources.get(), 60, "402 Payment Required: insufficient balance")
    top_up = threading.Timer(2.0, setattr, (service, "balance", 20.0))
    top_up.start()
    started = time.monotonic()
    out = handle(request={"prompt": "x"}, job_id="patient")
    waited = time.monotonic() - started
    top_up.join()
    assert out.status is JobStatus.submitted and 1.9 <= waited < 6
    kinds = [r["kind"] for r in service.requests_log()]
    assert kinds[-1] == "submit" and set(kinds[:-1]) == {"other"} and len(kinds) >= 3  # asked, then one submit
    assert budget()["paused_for"] == 0


# -- waiting in place for the budget (the message is held, not sent back) --------------------


@pytest.mark.parametrize("max_rps", [None, "50"])
def test_a_submit_waits_in_place_through_a_short_pause(service, configure, max_rps):
    if max_rps:
        configure(MODELLIX_MAX_RPS=max_rps)
    started = time.monotonic()  # before the pause is set: a slow write must not shorten the wait measured
    set_budget(paused_until=time.time() + 2, pause_reason="429 from Modellix")
    out = handle(request={"prompt": "x"}, job_id="waited")
    assert out.status is JobStatus.submitted  # one delivery: no retry through the broker
    assert 1.8 <= time.monotonic() - started < 4
    assert service.stats()["submits"] == 1


def test_a_submit_waits_in_place_for_a_slot_within_the_hold(service, configure):
    configure(MODELLIX_MAX_RPS="1")
    started = time.monotonic()  # before the slot is set: a slow write must not shorten the wait measured
    set_budget(next_slot=time.time() + 2.5)  # further off than MAX_SLEEP allowed a thread to sleep before
    assert handle(request={"prompt": "x"}, job_id="waited").status is JobStatus.submitted
    assert 2.3 <= time.monotonic() - started < 4
    submits = [r for r in service.requests_log() if r["kind"] == "submit"]
    assert len(submits) == 1


def test_a_submit_waiting_for_budget_is_not_claimed_meanwhile(service, configure):
    configure(MODELLIX_MAX_RPS="1")
    set_budget(next_slot=time.time() + 3)
    waiter = threading.Thread(target=handle, kwargs={"request": {"prompt": "x"}, "job_id": "waiting"})
    waiter.start()
    time.sleep(1.5)
    # No row left `submitting` while it waits (the slot comes before the claim).
    assert (job("waiting").status, job("waiting").attempts) == ("queued", 0)
    waiter.join(10)
    assert job("waiting").status == "submitted"


@pytest.mark.parametrize("limit", [{"MODELLIX_MAX_RPS": "1"}, {"MODELLIX_MAX_IN_FLIGHT": "1"}, {}])
def test_turns_waiting_for_the_budget_end_at_once_when_the_worker_stops(service, configure, limit):
    configure(**limit)
    if limit.get("MODELLIX_MAX_IN_FLIGHT"):
        submitted("running")  # the fleet is full
    elif limit:
        set_budget(next_slot=time.time() + 100)  # well within MAX_HOLD: the submits would wait in place
    else:
        set_budget(paused_until=time.time() + 100, pause_reason="429 from Modellix")
    outcomes: list[OverBudget] = []

    def turn() -> None:
        try:
            take_and_send()
        except OverBudget as over:
            outcomes.append(over)

    for i in range(3):
        queue(f"w{i}")
    threads = [threading.Thread(target=turn) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    assert not outcomes  # all three wait for their turn
    stopped = time.monotonic()
    resources.get().stopping.set()  # what the worker_shutting_down hook does
    for t in threads:
        t.join(5)
    assert time.monotonic() - stopped < 0.5
    assert len(outcomes) == 3 and all(o.reason == "the worker is stopping" for o in outcomes)
    assert {(job(f"w{i}").status, job(f"w{i}").attempts) for i in range(3)} == {("queued", 0)}
    assert service.stats()["submits"] == (1 if limit.get("MODELLIX_MAX_IN_FLIGHT") else 0)


# -- booking a request slot, at its edges (the clock stopped at T) ----------------------

T = 1_900_000_000.0


@pytest.fixture
def stopped_clock(monkeypatch):
    class Clock:
        @staticmethod
        def time() -> float:
            return T

    monkeypatch.setattr(slots, "time", Clock)


def test_a_slot_exactly_the_horizon_away_is_booked(service, stopped_clock):
    set_budget(next_slot=T + 4.0, paused_until=0.0, pause_reason=None)
    assert slots._book(resources.get(), 10.0, 4.0) == T + 4.0
    with resources.get().transaction() as s:
        assert budget_row(s).next_slot == pytest.approx(T + 4.0 + slots.HEADROOM / 10.0)


def test_a_slot_waits_for_the_end_of_a_pause_within_the_horizon(service, stopped_clock):
    set_budget(next_slot=T - 5, paused_until=T + 2.0, pause_reason="429 from Modellix")
    assert slots._book(resources.get(), 10.0, 4.0) == T + 2.0
    assert resources.get().pause.reason == "429 from Modellix"  # this process's copy of the pause


def test_no_pause_reason_is_an_empty_one(service, stopped_clock):
    set_budget(next_slot=0.0, paused_until=0.0, pause_reason=None)
    assert slots._book(resources.get(), 10.0, 4.0) == T
    assert resources.get().pause.reason == ""


@pytest.mark.parametrize(
    "paused_until, reason",
    [
        (T + 60.0, "429 from Modellix"),  # the pause holds the slot back: its reason
        (T, "rate limit"),  # a pause that ends now is over: the queue of slots holds it back
        (0.0, "rate limit"),
    ],
)
def test_a_slot_beyond_the_horizon_says_why(service, stopped_clock, paused_until, reason):
    set_budget(next_slot=T + 30.0, paused_until=paused_until, pause_reason="429 from Modellix")
    with pytest.raises(waiting.OverBudget) as caught:
        slots._book(resources.get(), 10.0, 4.0)
    assert caught.value.reason == reason
    with resources.get().transaction() as s:
        assert budget_row(s).next_slot == T + 30.0  # nothing booked
