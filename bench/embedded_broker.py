"""The embedded broker against kombu's plain filesystem transport, same folders, same run.

    python bench/embedded_broker.py                  # 2000 messages of 1 KiB, 3 rounds, 5 kills
    python bench/embedded_broker.py --messages 500 --rounds 5

Prints, for each transport: messages/s published, consumed (get + ack), and both together
(N / (publish time + consume time)), the median of the rounds, taken in alternation. Then the
time until the messages a SIGKILLed consumer held are delivered again: to a consumer that starts
after the kill (it reaps when its channel opens), and to one already polling (it reaps every
REAP_INTERVAL seconds, and kombu polls every polling_interval, 1 s by default).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from kombu import Connection, Consumer, Message, Producer, Queue

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.wiring.embedded_broker import REAP_INTERVAL, Transport  # noqa: E402

QUEUE = "bench"

# Takes `count` messages without acking them, says so, waits to be killed.
HOLDER = """
import sys, time, json
from kombu import Connection, Queue
from worker.wiring.embedded_broker import Transport
options, queue, count = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
channel = Connection("filesystem://", transport=Transport, transport_options=options).channel()
held = 0
while held < count:
    if Queue(queue, channel=channel).get(no_ack=False) is None:
        time.sleep(0.01)
    else:
        held += 1
print("held", flush=True)
time.sleep(600)
"""


def folders(base: Path) -> dict[str, str]:
    opts = {}
    for name in ("queue", "control", "processed", "unacked", "bad"):
        (base / name).mkdir(parents=True)
        opts[name] = str(base / name)
    return {
        "data_folder_in": opts["queue"],
        "data_folder_out": opts["queue"],
        "control_folder": opts["control"],
        "processed_folder": opts["processed"],
        "unacked_folder": opts["unacked"],
        "bad_folder": opts["bad"],
    }


def connect(opts: dict[str, str], ours: bool) -> Connection:
    return Connection("filesystem://", transport=Transport if ours else None, transport_options=opts)


def throughput(opts: dict[str, str], ours: bool, count: int, size: int) -> tuple[float, float]:
    """Seconds to publish `count` messages, and to get and ack them all."""
    body = {"pad": "x" * size}
    with connect(opts, ours) as conn:
        channel = conn.channel()
        producer = Producer(channel)
        started = time.perf_counter()
        for _ in range(count):
            producer.publish(body, routing_key=QUEUE, serializer="json")
        published = time.perf_counter()
        queue = Queue(QUEUE, channel=channel)
        got = 0
        while (message := queue.get(no_ack=False)) is not None:
            message.ack()
            got += 1
        consumed = time.perf_counter()
    assert got == count, f"{got} of {count} consumed"
    return published - started, consumed - published


def start_holder(opts: dict[str, str], count: int) -> subprocess.Popen[bytes]:
    """Publish `count` messages and start a consumer process that takes them all without acking."""
    with connect(opts, True) as conn:
        producer = Producer(conn.channel())
        for i in range(count):
            producer.publish({"i": i}, routing_key=QUEUE, serializer="json")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, json.dumps(opts), QUEUE, str(count)], cwd=ROOT, stdout=subprocess.PIPE
    )
    assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
    return holder


def kill(holder: subprocess.Popen[bytes]) -> float:
    """SIGKILL the holder; returns when it died."""
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    return time.perf_counter()


def redelivered_to_new_consumer(opts: dict[str, str], count: int) -> float:
    killed = kill(start_holder(opts, count))
    with connect(opts, True) as conn:
        queue = Queue(QUEUE, channel=conn.channel())
        first = queue.get(no_ack=False)
        seconds = time.perf_counter() - killed
        assert first is not None, "not delivered again"
        first.ack()
        while (message := queue.get(no_ack=False)) is not None:
            message.ack()
    return seconds


def redelivered_to_running_consumer(opts: dict[str, str], count: int) -> float:
    """A kombu Consumer loop in a thread, as a Celery worker runs one: drain_events with the transport's polling."""
    holder = start_holder(opts, count)
    arrived: list[float] = []
    polling = threading.Event()

    def consume() -> None:
        def on_message(body: object, message: Message) -> None:
            arrived.append(time.perf_counter())
            message.ack()

        with connect(opts, True) as conn, Consumer(conn, [Queue(QUEUE)], callbacks=[on_message], accept=["json"]):
            polling.set()
            deadline = time.perf_counter() + 30
            while len(arrived) < count and time.perf_counter() < deadline:
                try:
                    conn.drain_events(timeout=1)
                except TimeoutError:
                    continue

    thread = threading.Thread(target=consume)
    thread.start()
    polling.wait()
    time.sleep(random.uniform(0, REAP_INTERVAL + 1))  # a random point of its reap and poll cycle
    killed = kill(holder)
    thread.join()
    assert len(arrived) == count, f"{len(arrived)} of {count} delivered again"
    return arrived[0] - killed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=1024, help="body bytes per message")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--held", type=int, default=10, help="messages the killed consumer holds")
    args = parser.parse_args()
    logging.getLogger("worker.wiring.embedded_broker").setLevel(logging.ERROR)  # one WARNING per reap otherwise

    with tempfile.TemporaryDirectory(prefix="kling-bench-broker-") as tmp:
        base = Path(tmp)
        times: dict[str, list[tuple[float, float]]] = {"plain": [], "ours": []}
        for r in range(args.rounds):
            for name in ("plain", "ours"):
                opts = folders(base / f"{name}-{r}")
                times[name].append(throughput(opts, name == "ours", args.messages, args.size))
        print(f"{args.messages} messages of {args.size} B, median of {args.rounds} rounds:")
        print(f"{'transport':<10} {'publish/s':>10} {'consume/s':>10} {'both/s':>10}")
        for name, rounds in times.items():
            publish = statistics.median(p for p, _ in rounds)
            consume = statistics.median(c for _, c in rounds)
            both = statistics.median(p + c for p, c in rounds)
            n = args.messages
            print(f"{name:<10} {n / publish:>10.0f} {n / consume:>10.0f} {n / both:>10.0f}")

        kills = range(args.kills)
        fresh = [redelivered_to_new_consumer(folders(base / f"fresh-{k}"), args.held) for k in kills]
        running = [redelivered_to_running_consumer(folders(base / f"running-{k}"), args.held) for k in kills]
        print(f"\nredelivery after SIGKILL of a consumer holding {args.held} messages ({args.kills} kills):")
        print(f"  to a consumer started after the kill: median {statistics.median(fresh) * 1000:.0f} ms, ", end="")
        print(f"max {max(fresh) * 1000:.0f} ms (includes opening its connection)")
        print(f"  to a consumer already polling:        median {statistics.median(running):.2f} s, ", end="")
        print(f"max {max(running):.2f} s (REAP_INTERVAL {REAP_INTERVAL:g} s + polling interval 1 s)")
        print("  kombu's plain filesystem transport: never (the files were deleted when read)")


if __name__ == "__main__":
    main()
