"""The embedded broker (worker.wiring.embedded_broker) with real consumer processes: what a killed
consumer held comes back, exactly what was acked goes. An embedded worker killed mid-batch:
tests/e2e/test_embedded_broker.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kombu import Connection, Producer, Queue

from tests.support.embedded import messages
from tests.support.jobs import wait_for
from worker.dev.processes import ROOT
from worker.wiring import embedded_broker

QUEUE = "q"

# A consumer in its own process: takes `count` messages without acking them, says which, then
# waits to be killed. With "fork" it first forks a child that outlives it, and speaks only once the
# child is past the fork's own handlers (where it lets go of the lock): a test that kills the parent
# on a busy machine must not find the child still in os.fork().
CONSUMER = """
import json, os, sys, time
from kombu import Connection, Queue
from worker.wiring.embedded_broker import Transport

options, queue, count, fork = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:] == ["fork"]
channel = Connection("filesystem://", transport=Transport, transport_options=options).channel()
held = []
while len(held) < count:
    message = Queue(queue, channel=channel).get(no_ack=False)
    if message is None:
        time.sleep(0.02)
    else:
        held.append(message.payload)
ready, told = os.pipe()
child = os.fork() if fork else None
if child == 0:
    os.write(told, b"x")
    time.sleep(120)
    os._exit(0)
if child:
    os.read(ready, 1)
print(json.dumps({"held": held, "child": child}), flush=True)
time.sleep(120)
"""

# Publishes `count` messages of `size` bytes, with our transport or kombu's plain one.
PRODUCER = """
import json, sys
from kombu import Connection, Producer
from worker.wiring.embedded_broker import Transport

options, queue, kind = json.loads(sys.argv[1]), sys.argv[2], sys.argv[5]
count, size = int(sys.argv[3]), int(sys.argv[4])
conn = Connection("filesystem://", transport=Transport if kind == "ours" else None, transport_options=options)
producer = Producer(conn.channel())
for i in range(count):
    producer.publish({"i": i, "pad": "x" * size}, routing_key=queue, serializer="json")
"""


def options(tmp_path: Path) -> dict[str, str]:
    broker = tmp_path / "broker"
    folders = {name: broker / name for name in ("queue", "control", "processed", "unacked", "bad")}
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


def connect(opts: dict[str, str], plain: bool = False) -> Connection:
    return Connection("filesystem://", transport=None if plain else embedded_broker.Transport, transport_options=opts)


def publish(opts: dict[str, str], *bodies: dict, plain: bool = False) -> None:
    with connect(opts, plain) as conn:
        producer = Producer(conn.channel())
        for body in bodies:
            producer.publish(body, routing_key=QUEUE, serializer="json")


def take(channel, no_ack: bool = False):
    return Queue(QUEUE, channel=channel).get(no_ack=no_ack)


def drain(opts: dict[str, str]) -> list[dict]:
    """Every message on the queue now, acked, in delivery order."""
    got = []
    with connect(opts) as conn:
        channel = conn.channel()
        while (message := take(channel)) is not None:
            got.append(message.payload)
            message.ack()
    return got


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()


@pytest.fixture
def consumers():
    """Starts CONSUMER processes: (process, what it said); whichever the test did not kill dies afterwards."""
    started: list[subprocess.Popen] = []

    def start(opts: dict[str, str], count: int, fork: bool = False) -> tuple[subprocess.Popen, dict]:
        proc = subprocess.Popen(
            [sys.executable, "-c", CONSUMER, json.dumps(opts), QUEUE, str(count)] + (["fork"] if fork else []),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        line = proc.stdout.readline()
        assert line, f"the consumer exited {proc.wait()} before taking its messages"
        return proc, json.loads(line)

    yield start
    for proc in started:
        if proc.returncode is None:
            kill(proc)


def test_messages_a_killed_consumer_held_are_delivered_again(tmp_path, consumers):
    opts = options(tmp_path)
    publish(opts, {"n": 1}, {"n": 2}, {"n": 3})
    proc, said = consumers(opts, 2)
    assert said["held"] == [{"n": 1}, {"n": 2}]
    held = list(Path(opts["unacked_folder"]).glob("*/*.msg"))
    assert len(held) == 2 and len(messages(opts["data_folder_in"])) == 1
    assert held[0].parent.name.startswith(f"{proc.pid}-")  # the consumer id names its process

    kill(proc)
    # A new consumer reaps when its channel opens: the dead one's messages first, in their order.
    assert drain(opts) == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert messages(tmp_path) == [] and not held[0].parent.exists()


def test_a_running_consumer_reaps_a_dead_ones_messages_while_it_polls(tmp_path, consumers):
    opts = options(tmp_path)
    publish(opts, {"n": 1})
    with connect(opts) as conn:
        channel = conn.channel()  # opened (and reaped) while the other consumer lives
        proc, _ = consumers(opts, 1)
        assert take(channel) is None
        kill(proc)
        killed = time.monotonic()
        message = wait_for(lambda: take(channel), embedded_broker.REAP_INTERVAL + 5, "the message delivered again")
        assert message.payload == {"n": 1}
        assert time.monotonic() - killed <= embedded_broker.REAP_INTERVAL + 1
        message.ack()
    assert messages(tmp_path) == []


def test_ack_deletes_the_message_and_a_closed_channel_gives_back_the_rest_once(tmp_path):
    opts = options(tmp_path)
    publish(opts, *({"n": n} for n in range(4)))
    names = messages(opts["data_folder_in"])
    with connect(opts) as conn:
        channel = conn.channel()
        first, *rest = [take(channel) for _ in range(4)]
        first.ack()
        assert messages(opts["data_folder_in"]) == [] and messages(opts["unacked_folder"]) == names[1:]
    # Closing restored the three unacked ones: the same files, back under their names, no copies.
    assert messages(opts["data_folder_in"]) == names[1:]
    assert drain(opts) == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert drain(opts) == [] and messages(tmp_path) == []


def test_with_store_processed_an_acked_message_is_kept_in_the_processed_folder(tmp_path):
    opts = {**options(tmp_path), "store_processed": True}
    publish(opts, {"n": 1})
    names = messages(opts["data_folder_in"])
    assert drain(opts) == [{"n": 1}]
    assert messages(opts["processed_folder"]) == names and messages(opts["unacked_folder"]) == []


def test_reject_with_requeue_puts_the_message_back_in_its_place_and_without_requeue_drops_it(tmp_path):
    opts = options(tmp_path)
    publish(opts, {"n": 1}, {"n": 2}, {"n": 3})
    with connect(opts) as conn:
        channel = conn.channel()
        one, two = take(channel), take(channel)
        one.reject(requeue=True)
        again = take(channel)
        assert again.payload == {"n": 1} and again.delivery_tag != one.delivery_tag
        two.reject(requeue=False)
        channel.basic_ack(one.delivery_tag)  # a late ack of the earlier delivery must not settle the new one
        assert len(messages(opts["unacked_folder"])) == 1
        again.ack()
    assert drain(opts) == [{"n": 3}]
    assert messages(tmp_path) == []


def test_a_message_taken_without_ack_leaves_nothing_behind(tmp_path):
    opts = options(tmp_path)
    publish(opts, {"n": 1})
    with connect(opts) as conn:
        assert take(conn.channel(), no_ack=True).payload == {"n": 1}
        assert messages(tmp_path) == []
    assert messages(tmp_path) == []


def test_a_forked_child_does_not_keep_its_dead_parents_messages(tmp_path, consumers):
    opts = options(tmp_path)
    publish(opts, {"n": 1})
    proc, said = consumers(opts, 1, fork=True)
    try:
        kill(proc)  # the parent only: its child, which inherited the lock's descriptor, lives on
        assert drain(opts) == [{"n": 1}]
    finally:
        os.kill(said["child"], signal.SIGKILL)


def test_a_reader_never_sees_a_message_being_written(tmp_path):
    # kombu's plain reader takes a file as soon as its name appears and reads it without a lock:
    # it fails on any half-written message (with kombu's plain producer it does, within a few messages).
    opts = options(tmp_path)
    count = 60
    producer = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, json.dumps(opts), QUEUE, str(count), str(2_000_000), "ours"], cwd=ROOT
    )
    got = []
    try:
        with connect(opts, plain=True) as conn:
            channel = conn.channel()
            deadline = time.monotonic() + 120
            while len(got) < count and time.monotonic() < deadline:
                message = take(channel, no_ack=True)
                if message is None:
                    time.sleep(0.001)
                else:
                    got.append(message.payload["i"])
    finally:
        producer.wait(60)
    assert got == list(range(count))
    assert not [p for p in Path(opts["data_folder_in"]).iterdir()]  # no partial file left behind


def test_a_file_that_does_not_parse_is_kept_aside_and_the_next_one_is_delivered(tmp_path, caplog):
    opts = options(tmp_path)
    queue = Path(opts["data_folder_in"])
    (queue / f"1_{uuid.uuid4()}.{QUEUE}.msg").write_text('{"properties": {"delivery_tag": "x"')  # cut short
    empty = queue / f"2_{uuid.uuid4()}.{QUEUE}.msg"
    empty.write_bytes(b"")  # a plain producer between its open() and its write
    publish(opts, {"n": 1})
    with caplog.at_level("ERROR", logger="worker.wiring.embedded_broker"):
        assert drain(opts) == [{"n": 1}]
    assert [p.name.split("_")[0] for p in Path(opts["bad_folder"]).iterdir()] == ["1"]
    assert "does not parse" in caplog.text
    assert empty.exists()  # young and empty: given back for its producer to finish, not set aside
    os.utime(empty, (time.time() - 60, time.time() - 60))
    assert drain(opts) == [] and not empty.exists() and len(list(Path(opts["bad_folder"]).iterdir())) == 2


def test_plain_filesystem_producers_and_consumers_work_with_it(tmp_path):
    opts = options(tmp_path)
    publish(opts, {"from": "plain"}, plain=True)
    assert drain(opts) == [{"from": "plain"}]
    publish(opts, {"from": "ours"})
    with connect(opts, plain=True) as conn:
        assert take(conn.channel(), no_ack=True).payload == {"from": "ours"}
