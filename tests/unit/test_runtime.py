"""This process's resources: one of each, made once, never shared across a fork."""

from __future__ import annotations

import os
import threading
import time

from worker import resources


def test_resources_are_made_once_however_many_threads_race_for_them(configure, monkeypatch):
    configure(KLING_CONCURRENCY="4")
    made: list[int] = []
    res = resources.get()

    def make() -> object:
        made.append(1)
        time.sleep(0.05)  # long enough for the other threads to arrive
        return object()

    monkeypatch.setattr(resources, "BalanceAsked", make)  # what Resources.balance_asked is made with
    made_in = resources.Resources.balance_asked.made_in
    assert made_in(res) is None and not made  # asking whether it was made makes nothing
    found: list[object] = []
    threads = [threading.Thread(target=lambda: found.append(res.balance_asked)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and len({id(f) for f in found}) == 1
    assert made_in(res) is found[0]


def test_a_forked_process_makes_its_own(configure):
    configure(KLING_CONCURRENCY="4")
    parent = resources.get()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running the parent's cleanup
        child = resources.get()
        os.write(write, b"ok" if child is not parent and child.pid == os.getpid() else b"no")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 2) == b"ok"
    assert resources.get() is parent  # the parent keeps its own


def test_reset_closes_what_was_made_and_starts_afresh(configure, sqlite_url):
    configure(DATABASE_URL=sqlite_url, KLING_CONCURRENCY="4")
    first = resources.get()
    poller = first.poller
    with first.statement() as ex:
        ex.exec_driver_sql("select 1")
    resources.reset()
    assert resources.get() is not first
    assert poller._stopped and first._made == {}
