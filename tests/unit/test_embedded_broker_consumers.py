"""The embedded broker (worker.wiring.embedded_broker) in this process: consumers with and without acks on
one channel, and what a forked child lets go of. Killed consumer processes: tests/unit/test_embedded_broker.py."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest
from kombu import Connection, Consumer, Producer, Queue

from tests.support.embedded import messages
from worker.wiring import embedded_broker

QUEUE = "q"


def options(tmp_path: Path) -> dict[str, str]:
    folders = {name: tmp_path / "broker" / name for name in ("queue", "control", "processed", "unacked", "bad")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(folders["queue"]),
        "data_folder_out": str(folders["queue"]),
        "control_folder": str(folders["control"]),
        "processed_folder": str(folders["processed"]),
        "unacked_folder": str(folders["unacked"]),
        "bad_folder": str(folders["bad"]),
    }


def connect(opts: dict[str, str]) -> Connection:
    return Connection("filesystem://", transport=embedded_broker.Transport, transport_options=opts)


def publish(opts: dict[str, str], *bodies: dict) -> None:
    with connect(opts) as conn:
        producer = Producer(conn.channel())
        for body in bodies:
            producer.publish(body, routing_key=QUEUE, serializer="json")


def drain(opts: dict[str, str]) -> list[dict]:
    """Every message on the queue now, acked, in delivery order."""
    got = []
    with connect(opts) as conn:
        channel = conn.channel()
        while (message := Queue(QUEUE, channel=channel).get()) is not None:
            got.append(message.payload)
            message.ack()
    return got


# -- consumers with and without acks ---------------------------------------------------------


def consume(channel, no_ack: bool, into: list) -> Consumer:
    consumer = Consumer(channel, [Queue(QUEUE)], no_ack=no_ack, callbacks=[lambda body, message: into.append(message)])
    consumer.consume()
    return consumer


def test_a_consumer_without_acks_leaves_nothing_behind_and_is_not_held_back_by_prefetch(tmp_path):
    opts = options(tmp_path)
    publish(opts, {"n": 1}, {"n": 2}, {"n": 3})
    with connect(opts) as conn:
        channel = conn.channel()
        channel.basic_qos(0, 1, False)  # one unacked message at a time: none of these counts
        got: list = []
        consume(channel, True, got)
        assert channel._no_ack_queues == {QUEUE}
        for _ in range(3):
            conn.drain_events(timeout=2)
        assert [m.payload for m in got] == [{"n": 1}, {"n": 2}, {"n": 3}]
        assert messages(tmp_path) == []  # delivered means done: no file kept for an ack that never comes
    assert messages(tmp_path) == []  # and nothing to give back at close


def test_a_consumer_with_acks_holds_each_message_until_its_ack(tmp_path):
    opts = options(tmp_path)
    publish(opts, {"n": 1}, {"n": 2})
    names = messages(opts["data_folder_in"])
    with connect(opts) as conn:
        channel = conn.channel()
        got: list = []
        consume(channel, False, got)
        assert channel._no_ack_queues == set()
        conn.drain_events(timeout=2)
        assert [m.payload for m in got] == [{"n": 1}]
        assert messages(opts["unacked_folder"]) == names[:1]
        got[0].ack()
        assert messages(opts["unacked_folder"]) == []
        conn.drain_events(timeout=2)
        assert [m.payload for m in got] == [{"n": 1}, {"n": 2}]
        assert messages(opts["unacked_folder"]) == names[1:]
    # Not acked when the channel closed: given back, under its own name.
    assert messages(opts["data_folder_in"]) == names[1:]
    assert drain(opts) == [{"n": 2}]


def test_after_a_consumer_without_acks_is_cancelled_its_queue_takes_acks_again(tmp_path):
    opts = options(tmp_path)
    publish(opts, {"n": 1})
    with connect(opts) as conn:
        channel = conn.channel()
        free: list = []
        consumer = consume(channel, True, free)
        conn.drain_events(timeout=2)
        assert [m.payload for m in free] == [{"n": 1}] and messages(tmp_path) == []
        consumer.cancel()
        assert channel._no_ack_queues == set()

        publish(opts, {"n": 2})
        held: list = []
        consume(channel, False, held)
        conn.drain_events(timeout=2)
        assert [m.payload for m in held] == [{"n": 2}]
        assert len(messages(opts["unacked_folder"])) == 1  # kept until its ack, not settled as taken
        held[0].ack()
        assert messages(tmp_path) == []


def test_cancelling_one_consumer_leaves_another_queues_without_acks(tmp_path):
    opts = options(tmp_path)
    with connect(opts) as conn:
        channel = conn.channel()
        mine = Consumer(channel, [Queue("other")], no_ack=True, callbacks=[])
        mine.consume()
        theirs = consume(channel, True, [])
        assert channel._no_ack_queues == {"other", QUEUE}
        theirs.cancel()
        assert channel._no_ack_queues == {"other"}
        channel.basic_cancel("no-such-consumer")  # an unknown tag changes nothing
        assert channel._no_ack_queues == {"other"}


# -- a forked child lets go of its parent's lock -----------------------------------------------


@pytest.fixture
def holders(monkeypatch):
    """The module's holders as the test's own, so that forgetting them leaves the rest of the process's alone."""
    monkeypatch.setattr(embedded_broker, "_holders", {})
    monkeypatch.setattr(embedded_broker, "_holders_lock", threading.Lock())


def lock_taken(path) -> bool:
    """Whether another open file description could take the lock on `path` now (and lets it go again)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_forgetting_the_parents_folders_drops_their_locks_and_forgets_them(tmp_path, holders):
    root, queue = tmp_path / "unacked", tmp_path / "queue"
    queue.mkdir()
    held = embedded_broker._holder(root)
    lock = held.folder / embedded_broker.LOCK
    (held.folder / "1_a.q.msg").write_text("{}")  # a message the parent had claimed
    assert lock_taken(lock)
    assert embedded_broker.reap(root, queue) == 0  # its owner lives
    old_lock = embedded_broker._holders_lock

    embedded_broker._forget_parent_folders()

    assert embedded_broker._holders == {}
    assert embedded_broker._holders_lock is not old_lock and not embedded_broker._holders_lock.locked()
    assert not lock_taken(lock)  # this process no longer holds it: when the parent dies, it is free
    # The folder is no longer this process's own: a reaper finds it unlocked and gives its message back.
    assert embedded_broker.reap(root, queue) == 1
    assert messages(queue) == ["1_a.q.msg"] and not held.folder.exists()
    again = embedded_broker._holder(root)  # the child claims into a folder of its own
    assert again.folder != held.folder and lock_taken(again.folder / embedded_broker.LOCK)


def test_a_forked_child_does_not_hold_its_parents_lock(tmp_path, holders):
    held = embedded_broker._holder(tmp_path / "unacked")
    lock = held.folder / embedded_broker.LOCK
    said, tell = os.pipe()
    done, finish = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the fork's own handler has run; report, wait for the parent, leave
        try:
            os.write(tell, b"empty" if embedded_broker._holders == {} else b"kept!")
            os.read(done, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(said, 5) == b"empty"
        assert lock_taken(lock)  # the parent's own descriptor still holds it
        os.close(held.lock_fd)  # the parent goes (as its death would close it)
        embedded_broker._holders.clear()
        assert not lock_taken(lock)  # the living child does not keep it
    finally:
        os.write(finish, b"x")
        os.waitpid(pid, 0)
        for fd in (said, tell, done, finish):
            os.close(fd)
