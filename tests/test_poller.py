"""The per-process poll scheduler: order, chaining, and faults that must not stop it."""

from __future__ import annotations

import threading
import time

from worker.poller import Poller


def test_polls_run_in_due_order_and_chain_until_done():
    calls: list[tuple[str, int, float]] = []
    done = threading.Event()
    started = time.monotonic()

    def poll(job_id: str, seq: int):
        calls.append((job_id, seq, time.monotonic() - started))
        if job_id == "a" and seq < 2:
            return seq + 1, 0.5
        if job_id == "a":
            done.set()
        return None

    poller = Poller(poll, threads=4)
    poller.schedule("b", 0, 0.2)  # between a's polls by 200 ms or more: order holds on a loaded machine
    poller.schedule("a", 0, 0.0)
    assert done.wait(5)
    assert [(j, s) for j, s, _ in calls] == [("a", 0), ("b", 0), ("a", 1), ("a", 2)]
    assert calls[-1][2] >= 1.0  # two 500 ms gaps were honoured
    assert poller.pending() == 0


def test_a_failing_poll_is_logged_and_the_poller_goes_on(caplog):
    seen = threading.Event()

    def poll(job_id: str, seq: int):
        if job_id == "bad":
            raise RuntimeError("database gone")
        seen.set()
        return None

    poller = Poller(poll, threads=2)
    poller.schedule("bad", 0, 0)
    poller.schedule("good", 0, 0.05)
    assert seen.wait(5)
    assert "job bad: poll 0 failed" in caplog.text
