"""kling-worker at scale: does a job cost the same with a big table and a long queue?

    python bench/scale.py                                   # 1,000 / 10,000 / 100,000, then 10,000 in flight
    python bench/scale.py --sizes 500,2000 --window 300 --in-flight 500   # a smoke run (< 2 minutes)
    python bench/scale.py --sizes 100000 --in-flight 0      # one size, no in-flight run

For each size N, in a fresh PostgreSQL database:

1. the jobs table is filled with N ended jobs (succeeded, with a realistic request, last answer, result
   URLs and archived files, and each one's `done` archive row in the outbox) by one INSERT ... SELECT
   FROM generate_series, then VACUUM ANALYZE: "DB B/job" is (pg_total_relation_size of jobs +
   deliveries) / N;
2. the hot statements are run once in a transaction that is rolled back, their SQL caught on its way
   to the driver, and EXPLAINed (not ANALYZEd): the plan's first scan node is printed per statement
   (Index, IndexOnly, Bitmap, Seq); a Seq Scan is listed as a finding below the table;
3. N `kling.generate` messages (Celery protocol 2, as send_task writes them, published with kombu)
   wait on a fresh RabbitMQ queue; two workers (128 threads, beat on the first) run against the
   sandbox (latency 0, tasks of 2 s). After a warm-up of window/10 jobs, the next `--window` jobs
   to end are measured while the queue is topped up to N messages twice a second (a backlog of N
   throughout, at every size): worker CPU per job (user+system of both
   workers over the window / jobs ended in it), jobs/s, peak RSS per worker, and the sweep's
   database work (tracking.sweep's and delivery.due's claims: overdue polls, stale submits, due
   outbox rows), timed from this process once a second in a transaction that is rolled back, so
   it takes nothing from the workers.

Then "in flight": an empty database, sandbox tasks of `--in-flight-seconds` (120), and `--in-flight`
messages (10,000): the workers submit until that many are in flight at once, or until the first
job ends (the most this machine reaches is then submits/s x task time), or `--in-flight-timeout`.
It prints the number reached, the peak RSS per worker and the sweep's time at that point.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from kombu import Connection, Exchange, Producer, Queue
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import (  # noqa: E402
    Sandbox,
    cpu_seconds,
    fresh_database,
    metered_workers,
    peak_rss_mb,
    queue_depth,
    wait_ready,
    worker_env,
)
from models import budget, lifecycle, outbox, store, tenants  # noqa: E402
from models.job import JobStatus, utcnow  # noqa: E402
from worker.dev.processes import Worker  # noqa: E402

ENDED = ("succeeded", "failed", "rejected", "cancelled")
IN_FLIGHT = ("submitting", "submitted", "processing")

# N ended jobs as the workers leave them: the request as validated, the sandbox's last answer,
# one signed result URL, its archived file, and the archive row settled `done`.
PREFILL_JOBS = """
INSERT INTO jobs (id, status, modellix_task_id, request, metadata, result_urls, attempts, polls,
                  last_response, created_at, updated_at, submitted_at, finished_at, files)
SELECT 'pre-' || i, 'succeeded', t.task,
       jsonb_build_object('prompt', 'a lighthouse on a cliff at dusk, waves, volumetric light, 35 mm, shot '
                          || i, 'resolution', '1k', 'aspect_ratio', '16:9', 'n', 1),
       jsonb_build_object('batch', 'nightly-' || (i / 1000), 'customer', 'c' || (i % 97)),
       jsonb_build_array(t.url),
       1, 3,
       jsonb_build_object('task_id', t.task, 'model_id', 'kling-image-o1', 'status', 'success',
                          'result', jsonb_build_object('resources',
                              jsonb_build_array(jsonb_build_object('url', t.url, 'type', 'image')))),
       t.at, t.at + interval '9 s', t.at + interval '200 ms', t.at + interval '8 s',
       jsonb_build_array(jsonb_build_object(
           'uri', 'file:///var/lib/kling/archive/pre-' || i || '/0.png',
           'sha256', encode(sha256(('img' || i)::bytea), 'hex'),
           'bytes', 1048576, 'content_type', 'image/png', 'error', null))
FROM generate_series(1, :n) AS i,
     LATERAL (SELECT 'tsk_' || md5(i::text) AS task,
                     'https://cdn.modellix.example/results/tsk_' || md5(i::text) || '/0.png?X-Amz-Expires=3600'
                     || '&X-Amz-Signature=' || md5('s' || i) || md5('t' || i) AS url,
                     now() - interval '2 days' + i * interval '1 s' AS at) AS t
"""
PREFILL_DELIVERIES = """
INSERT INTO deliveries (job_id, channel, state, attempts, due_at, created_at, updated_at, done_at)
SELECT id, 'archive', 'done', 1, NULL, finished_at, finished_at + interval '1 s', finished_at + interval '1 s'
FROM jobs
"""


def prefill(engine: Engine, n: int) -> float:
    """N ended jobs and their archive rows; returns the database bytes per job."""
    with engine.begin() as conn:
        conn.execute(text(PREFILL_JOBS), {"n": n})
        conn.execute(text(PREFILL_DELIVERIES))
    # Plans and sizes as a table that has lived: statistics known, visibility map set.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE jobs"))
        conn.execute(text("VACUUM ANALYZE deliveries"))
        size = conn.execute(
            text("SELECT pg_total_relation_size('jobs') + pg_total_relation_size('deliveries')")
        ).scalar_one()
    return size / n


# -- plans ------------------------------------------------------------------------


@contextmanager
def caught_sql(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """The statements (as sent to the driver, with their parameters) that run inside the block."""
    seen: list[tuple[str, Any]] = []

    def catch(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", catch)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", catch)


def hot_statements() -> dict[str, Callable[[Session], Any]]:
    """Each hot path's first statement, called as the workers call it."""
    now = utcnow()
    return {
        "poll claim": lambda s: store.claim_poll(s, "pre-1", 3, now, 45.0),
        "queue a job": lambda s: lifecycle.create(
            s, f"new-{uuid.uuid4().hex}", JobStatus.queued, {"prompt": "p"}, None, now
        ),
        "line read": lambda s: tenants.waiting(s, now),
        "sweep overdue": lambda s: store.claim_overdue_polls(s, now, 45.0, 500),
        "outbox due": lambda s: outbox.claim_due(s, now, 120.0, 200),
        "in flight": lambda s: budget.count_in_flight(s, up_to=1000),
        "backlog": lambda s: outbox.backlog(s, now),
    }


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)


SHORT = {"Seq Scan": "Seq", "Index Scan": "Index", "Index Only Scan": "IndexOnly", "Bitmap Heap Scan": "Bitmap"}


def summarize(plan: dict[str, Any]) -> tuple[str, str]:
    """(one word, detail): the plan's first scan node (depth first from the top), else its top node."""
    nodes = list(_nodes(plan))
    for node in nodes:
        kind = node["Node Type"]
        if kind in SHORT or kind.endswith("Scan"):
            where = node.get("Index Name") or node.get("Relation Name", "")
            return SHORT.get(kind, kind.replace(" ", "")), f"{kind} on {node.get('Relation Name', '?')} ({where})"
    top = plan.get("Operation") or plan["Node Type"]
    arbiter = plan.get("Conflict Arbiter Indexes")
    return top, f"{top} ({'arbiter ' + ', '.join(arbiter) if arbiter else plan['Node Type']})"


def explain_all(engine: Engine) -> dict[str, tuple[str, str]]:
    plans: dict[str, tuple[str, str]] = {}
    for name, call in hot_statements().items():
        with engine.connect() as conn, Session(bind=conn) as s:
            with caught_sql(engine) as seen:
                call(s)
            statement, parameters = seen[0]
            # EXPLAIN without ANALYZE runs nothing; the call above is rolled back with the session.
            raw = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters).scalar_one()
            s.rollback()
        plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
        plans[name] = summarize(plan)
    return plans


# -- the sweep, timed from here -----------------------------------------------------


def time_sweep(engine: Engine) -> tuple[float, float]:
    """(sweep ms, backlog ms): the sweep's claims (tracking.sweep, delivery.due) in one transaction
    rolled back, and the metrics scrape's outbox backlog read."""
    now = utcnow()
    began = time.perf_counter()
    with Session(engine) as s:
        store.claim_overdue_polls(s, now - timedelta(seconds=10), 45.0, 500)
        store.claim_stale(s, JobStatus.submitting, now - timedelta(seconds=120), 500)
        outbox.claim_due(s, now, 120.0, 200)
        s.rollback()
    sweep = time.perf_counter() - began
    began = time.perf_counter()
    with engine.connect() as conn:
        outbox.backlog(conn, now)
    return sweep * 1000, (time.perf_counter() - began) * 1000


# -- the backlog on RabbitMQ ------------------------------------------------------------


def publish_backlog(broker: str, queue: str, n: int, tag: str) -> float:
    """N kling.generate messages as Celery's send_task writes them (protocol 2, JSON); returns seconds taken.

    The headers are one template (app.amqp.as_task_v2's for this task) with each message's id;
    the body is [args, kwargs, embed], serialised here once per message.
    """
    exchange = Exchange(queue, type="direct")
    declared = Queue(queue, exchange, routing_key=queue)  # as Celery declares a queue it is asked for
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    began = time.time()
    with Connection(broker) as conn:
        producer = Producer(conn.default_channel)
        declared.declare(channel=conn.default_channel)
        for i in range(n):
            task_id = str(uuid.uuid4())
            kwargs = {"request": {"prompt": f"scale {tag} {i}"}, "job_id": f"{tag}-{i}"}
            headers = {
                "lang": "py",
                "task": "kling.generate",
                "id": task_id,
                "shadow": None,
                "eta": None,
                "expires": None,
                "group": None,
                "group_index": None,
                "retries": 0,
                "timelimit": [None, None],
                "root_id": task_id,
                "parent_id": None,
                "argsrepr": "()",
                "kwargsrepr": repr(kwargs),
                "origin": "bench-scale",
                "ignore_result": False,
                "replaced_task_nesting": 0,
                "stamped_headers": None,
                "stamps": {},
            }
            producer.publish(
                json.dumps([[], kwargs, embed]),
                exchange=queue,
                routing_key=queue,
                content_type="application/json",
                content_encoding="utf-8",
                headers=headers,
                correlation_id=task_id,
                reply_to="",
                delivery_mode=2,
            )
    return time.time() - began


@contextmanager
def kept_full(broker: str, queue: str, n: int) -> Iterator[list[int]]:
    """Keep about N messages waiting on the queue (topped up twice a second) while the block runs:
    a backlog of N throughout the window, whatever N; yields the count of messages added."""
    added = [0]
    stop = threading.Event()

    def top_up() -> None:
        while not stop.wait(0.5):
            missing = n - queue_depth(broker, queue)
            if missing > 0:
                publish_backlog(broker, queue, missing, uuid.uuid4().hex[:6])
                added[0] += missing

    thread = threading.Thread(target=top_up, daemon=True)
    thread.start()
    try:
        yield added
    finally:
        stop.set()
        thread.join()


def delete_queue(broker: str, queue: str) -> None:
    with Connection(broker) as conn:
        conn.default_channel.queue_delete(queue)
        conn.default_channel.exchange_delete(queue)


@contextmanager
def fleet(args: argparse.Namespace, database: str, sandbox: Sandbox, queue: str, tmp: Path) -> Iterator[list[Worker]]:
    """Two workers (or --workers), beat on the first, as bench/run.py starts them."""
    env = worker_env(args.broker, database, sandbox, queue, tmp, args.concurrency)
    procs, ports = metered_workers(env, tmp, args.workers, args.concurrency)
    try:
        wait_ready(procs, ports)
        yield procs
    finally:
        for w in procs:
            w.stop()


def count(engine: Engine, statuses: tuple[str, ...], since: Any) -> int:
    # On (status, updated_at): reads only the rows the run touched, not the prefilled table.
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM jobs WHERE status = ANY(:s) AND updated_at >= :since"),
                {"s": list(statuses), "since": since},
            ).scalar_one()
        )


def run_size(args: argparse.Namespace, n: int, tmp: Path) -> dict[str, Any]:
    database, drop = fresh_database(args.database)
    engine = create_engine(database)
    sandbox = Sandbox(0.0, args.task_seconds)
    queue = f"bench-scale-{uuid.uuid4().hex[:6]}"
    try:
        began = time.time()
        bytes_per_job = prefill(engine, n)
        fill_s = time.time() - began
        plans = explain_all(engine)
        publish_s = publish_backlog(args.broker, queue, n, uuid.uuid4().hex[:6])
        since = utcnow()
        # The same window at every size: the queue is topped up to N while it runs (kept_full).
        window = args.window
        warm = max(1, window // 10)
        sweeps: list[tuple[float, float]] = []
        with fleet(args, database, sandbox, queue, tmp) as procs, kept_full(args.broker, queue, n) as added:
            deadline = time.time() + args.timeout
            while count(engine, ENDED, since) < warm and time.time() < deadline:
                time.sleep(0.1)
            t0, cpu0, ended0 = time.time(), sum(cpu_seconds(w.proc.pid) for w in procs), count(engine, ENDED, since)
            last_sweep = 0.0
            ended1 = ended0
            while ended1 < ended0 + window and time.time() < deadline:
                if time.time() - last_sweep >= 1.0:
                    last_sweep = time.time()
                    sweeps.append(time_sweep(engine))
                time.sleep(0.1)
                ended1 = count(engine, ENDED, since)
            t1, cpu1 = time.time(), sum(cpu_seconds(w.proc.pid) for w in procs)
            rss = [peak_rss_mb(w.proc.pid) for w in procs]
            left = queue_depth(args.broker, queue)
        jobs = ended1 - ended0
        return {
            "size": n,
            "bytes_per_job": bytes_per_job,
            "fill_s": fill_s,
            "publish_s": publish_s,
            "plans": plans,
            "jobs": jobs,
            "cpu_ms_per_job": (cpu1 - cpu0) / jobs * 1000 if jobs else float("nan"),
            "jobs_per_s": jobs / (t1 - t0),
            "rss": rss,
            "sweep_ms": statistics.median(s[0] for s in sweeps) if sweeps else float("nan"),
            "sweep_max_ms": max((s[0] for s in sweeps), default=float("nan")),
            "backlog_ms": statistics.median(s[1] for s in sweeps) if sweeps else float("nan"),
            "left_in_queue": left,
            "topped_up": added[0],
        }
    finally:
        delete_queue(args.broker, queue)
        sandbox.stop()
        engine.dispose()
        drop()


def run_in_flight(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    database, drop = fresh_database(args.database)
    engine = create_engine(database)
    sandbox = Sandbox(0.0, args.in_flight_seconds)
    queue = f"bench-scale-{uuid.uuid4().hex[:6]}"
    try:
        publish_backlog(args.broker, queue, args.in_flight, uuid.uuid4().hex[:6])
        since = utcnow()
        peak, peak_at, sweep_at_peak, why = 0, 0.0, (float("nan"), float("nan")), "timeout"
        with fleet(args, database, sandbox, queue, tmp) as procs:
            began = time.time()
            while time.time() - began < args.in_flight_timeout:
                with engine.connect() as conn:
                    now_in_flight = budget.count_in_flight(conn)
                if now_in_flight > peak:
                    peak, peak_at = now_in_flight, time.time() - began
                    sweep_at_peak = time_sweep(engine)
                if peak >= args.in_flight:
                    why = "all in flight"
                    break
                if count(engine, ENDED, since) > 0:
                    why = f"the first job ended ({args.in_flight_seconds:g} s task)"
                    break
                time.sleep(0.5)
            sweep_at_peak = time_sweep(engine) if why == "all in flight" else sweep_at_peak
            rss = [peak_rss_mb(w.proc.pid) for w in procs]
            # The partial indexes on active jobs are full now: the plans may differ from the ended table's.
            plans = explain_all(engine)
        return {
            "target": args.in_flight,
            "reached": peak,
            "after_s": peak_at,
            "why": why,
            "rss": rss,
            "sweep_ms": sweep_at_peak[0],
            "backlog_ms": sweep_at_peak[1],
            "plans": plans,
        }
    finally:
        delete_queue(args.broker, queue)
        sandbox.stop()
        engine.dispose()
        drop()


def table(rows: list[dict[str, Any]]) -> str:
    names = list(rows[0]["plans"]) if rows else []
    head = [
        "size",
        "DB B/job",
        "plans (" + " / ".join(names) + ")",
        "CPU ms/job",
        "jobs/s",
        "RSS MB/worker",
        "sweep ms",
    ]
    body = [
        [
            f"{r['size']:,}",
            f"{r['bytes_per_job']:.0f}",
            " ".join(word for word, _ in r["plans"].values()),
            f"{r['cpu_ms_per_job']:.2f}",
            f"{r['jobs_per_s']:.0f}",
            "/".join(f"{mb:.0f}" for mb in r["rss"]),
            f"{r['sweep_ms']:.1f} (max {r['sweep_max_ms']:.1f})",
        ]
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in [head, *body]) for i in range(len(head))]
    return "\n".join(" | ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) for line in [head, *body])


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sizes",
        default="1000,10000,100000",
        help="comma-separated table and backlog sizes (empty: only the in-flight run)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=2000,
        help="jobs measured per size (the queue kept at the size meanwhile), after a warm-up of a tenth of that",
    )
    p.add_argument("--in-flight", type=int, default=10000, help="jobs to hold in flight at once (0: skip)")
    # 120 s: at about 100 submits/s (two workers here) 10,000 are in flight before the first ends.
    p.add_argument("--in-flight-seconds", type=float, default=120.0, help="sandbox task time of the in-flight run")
    p.add_argument("--in-flight-timeout", type=float, default=600.0)
    p.add_argument("--task-seconds", type=float, default=2.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=128, help="threads per worker")
    p.add_argument("--broker", default=os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"))
    p.add_argument(
        "--database", default=os.environ.get("KLING_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds per size before giving up on the window")
    args = p.parse_args()

    print(
        f"# {os.cpu_count()} cores, {args.workers} workers x {args.concurrency} threads, sandbox latency 0, "
        f"task {args.task_seconds:g} s, window {args.window} jobs",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.sizes.split(",") if x]:
            r = run_size(args, n, Path(tmp))
            rows.append(r)
            print(
                f"size {n:,}: filled in {r['fill_s']:.1f} s, {n:,} messages published in {r['publish_s']:.1f} s "
                f"({n / r['publish_s']:.0f}/s), {r['topped_up']:,} more to keep it full; measured {r['jobs']} jobs, "
                f"{r['left_in_queue']:,} still queued after; outbox backlog read {r['backlog_ms']:.1f} ms",
                flush=True,
            )
            if not r["left_in_queue"]:
                print(f"  size {n:,}: the queue ran dry within the window: not a figure under backlog", flush=True)
        if rows:
            print()
            print(table(rows))
        for r in rows:
            for name, (word, detail) in r["plans"].items():
                if word == "Seq":
                    print(f"FINDING: size {r['size']:,}: {name}: {detail}")
        if rows:
            print("plans at the last size:")
            for name, (_, detail) in rows[-1]["plans"].items():
                print(f"  {name}: {detail}")
        if args.in_flight:
            f = run_in_flight(args, Path(tmp))
            print(
                f"\nin flight: {f['reached']:,} of {f['target']:,} at once, "
                f"{f['after_s']:.1f} s after both workers were ready "
                f"(stopped: {f['why']}); peak RSS per worker "
                + "/".join(f"{mb:.0f}" for mb in f["rss"])
                + f" MB; sweep {f['sweep_ms']:.1f} ms, outbox backlog read {f['backlog_ms']:.1f} ms at the peak"
            )
            print("plans while in flight:")
            for name, (word, detail) in f["plans"].items():
                print(f"  {name}: {detail}" + ("  <- FINDING" if word == "Seq" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
