"""The per-process poll timer: due order, chaining, and faults that must not stop it."""

from __future__ import annotations

import threading
import time

from worker.polling.timer import Poller


def test_calls_run_in_due_order_and_can_schedule_the_next():
    calls: list[tuple[str, int, float]] = []
    done = threading.Event()
    started = time.monotonic()
    poller = Poller(threads=4)

    def poll(job_id: str, seq: int) -> None:
        calls.append((job_id, seq, time.monotonic() - started))
        if job_id == "a" and seq < 2:
            poller.schedule(0.5, poll, "a", seq + 1)
        elif job_id == "a":
            done.set()

    poller.schedule(0.2, poll, "b", 0)  # between a's polls by 200 ms or more: order holds on a loaded machine
    poller.schedule(0.0, poll, "a", 0)
    assert done.wait(10)
    assert [(j, s) for j, s, _ in calls] == [("a", 0), ("b", 0), ("a", 1), ("a", 2)]
    assert calls[-1][2] >= 1.0  # two 500 ms gaps were honoured
    assert poller.pending() == 0
    poller.stop()


def test_a_failing_call_is_logged_and_the_poller_goes_on(caplog):
    seen = threading.Event()
    poller = Poller(threads=2)

    def bad(job_id: str) -> None:
        raise RuntimeError("database gone")

    poller.schedule(0, bad, "bad-job")
    poller.schedule(0.05, seen.set)
    assert seen.wait(5)
    assert "bad('bad-job',) failed" in caplog.text and "database gone" in caplog.text
    poller.stop()


def test_stop_drops_what_is_scheduled():
    ran = threading.Event()
    poller = Poller(threads=1)
    poller.schedule(0.3, ran.set)
    poller.stop()
    assert not ran.wait(0.6) and poller.pending() == 0


def test_drain_waits_for_running_calls_and_returns_what_is_left_with_its_time():
    poller = Poller(threads=2)
    finished = threading.Event()

    def slow() -> None:
        time.sleep(0.5)
        poller.schedule(3.0, finished.set)  # scheduled by a running call while draining
        finished.set()

    poller.schedule(0, slow)
    poller.schedule(10.0, print, "later")
    time.sleep(0.2)  # slow() is running
    left = poller.drain(timeout=5)
    assert finished.is_set()
    assert [(fn, args) for _, fn, args in left] == [(finished.set, ()), (print, ("later",))]
    assert 2.0 < left[0][0] <= 3.0 and 9.0 < left[1][0] <= 10.0
    assert poller.pending() == 0
