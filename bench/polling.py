"""What polling costs: API requests per job and how late results are recorded, learned vs configured schedule.

    python bench/run.py --polling                     # 600 jobs, 6 shapes, tasks 8-40 s, both schedules
    python bench/polling.py --jobs 300 --arrival 120 --learn on --poll-max 30

Real workers (RabbitMQ + PostgreSQL) against the sandbox, whose tasks take a
base duration per request shape within --task-seconds (±15 % per task). Jobs
of --shapes shapes (resolution, n, input images) arrive one by one, evenly
over --arrival seconds, as a steady stream would. For the first third of the
jobs (learning) and the rest (learned) it prints API requests per job (1
submit + polls), polls per job, and how long after its task's end each job's
result was recorded (the job row's finished_at against the sandbox's task end),
p50/p95. `--learn off` runs the configured schedule (KLING_POLL_LEARN=false),
as before the learned one existed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import Sandbox, fresh_database, jobs_ended, percentile, worker_env  # noqa: E402
from worker.dev.processes import Worker  # noqa: E402
from worker.dev.sandbox import base_seconds, parse_task_seconds  # noqa: E402
from worker.polling.schedule import Shape  # noqa: E402

# Sends each message at its "at" (seconds after the start): a stream, not a burst.
PACED_PRODUCER = """
import json, sys, time
from celery import Celery
app = Celery(broker=sys.argv[1])
app.conf.task_serializer = "json"
start = time.time()
for line in sys.stdin:
    item = json.loads(line)
    time.sleep(max(0.0, start + item["at"] - time.time()))
    app.send_task("kling.generate", kwargs=item["kwargs"], queue=sys.argv[2])
"""


def pick_shapes(count: int, span: tuple[float, float]) -> list[Shape]:
    """`count` shapes whose sandbox base durations spread evenly over `span`."""
    candidates = [Shape(r, n, i) for r in ("1k", "2k") for n in range(1, 5) for i in range(4)]
    candidates.sort(key=lambda s: base_seconds(span, s))
    step = (len(candidates) - 1) / max(1, count - 1)
    return [candidates[round(k * step)] for k in range(count)]


def request_of(shape: Shape, i: int) -> dict:
    images = [{"image": f"https://img.example/{i}-{k}.png"} for k in range(shape.images)]
    request = {"prompt": f"polling bench {i}", "resolution": shape.resolution, "n": shape.n}
    return {**request, "image_list": images} if images else request


def run_polling(args: argparse.Namespace, learn: bool, tmp: Path) -> dict:
    span = parse_task_seconds(args.task_seconds)
    span = span if isinstance(span, tuple) else (span, span)
    shapes = pick_shapes(args.shapes, span)
    sandbox = Sandbox(0.0, args.task_seconds)
    database, drop = fresh_database(args.database)
    queue = f"bench-poll-{uuid.uuid4().hex[:6]}"
    env = worker_env(args.broker, database, sandbox, queue, tmp, args.concurrency) | {
        "KLING_POLL_MAX": str(args.poll_max),
        "KLING_POLL_LEARN": "true" if learn else "false",
    }
    procs = [Worker(env, tmp, concurrency=args.concurrency, loglevel="WARNING") for _ in range(args.workers)]
    tag = uuid.uuid4().hex[:6]
    order = {f"{tag}-{i}": i for i in range(args.jobs)}
    try:
        for w in procs:
            w.wait_ready()
        lines = "".join(
            json.dumps(
                {
                    "at": args.arrival * i / args.jobs,
                    "kwargs": {"request": request_of(shapes[i % len(shapes)], i), "job_id": f"{tag}-{i}"},
                }
            )
            + "\n"
            for i in range(args.jobs)
        )
        subprocess.run(
            [sys.executable, "-c", PACED_PRODUCER, args.broker, queue],
            input=lines.encode(),
            check=True,
            timeout=args.arrival + 120,
            cwd=ROOT,
        )
        engine = create_engine(database)
        deadline = time.time() + args.timeout
        while time.time() < deadline:
            with engine.connect() as conn:
                done = jobs_ended(conn)
            if done >= args.jobs:
                break
            time.sleep(0.5)
        with engine.connect() as conn:
            rows = conn.execute(
                text("select id, status, modellix_task_id, extract(epoch from finished_at), polls from jobs")
            ).all()
        engine.dispose()
        stats = sandbox.stats()
        ends = requests.get(sandbox.url + "/_sandbox/tasks", timeout=30).json()["tasks"]
    finally:
        for w in procs:
            w.stop()
        sandbox.stop()
    drop()

    if args.dump:
        with open(args.dump, "a") as out:
            for r in rows:
                i = order[r[0]]
                shape = shapes[i % len(shapes)]
                lag = float(r[3]) - ends[r[2]]["finishes"] if r[1] == "succeeded" else None
                seconds = ends[r[2]]["finishes"] - ends[r[2]]["created"] if r[2] in ends else None
                line = {"learn": learn, "i": i, "shape": shape, "seconds": seconds, "polls": r[4], "lag": lag}
                out.write(json.dumps(line) + "\n")
    third = args.jobs // 3
    result: dict = {
        "learn": learn,
        "shapes": {f"{s.resolution} n={s.n} images={s.images}": round(base_seconds(span, s), 1) for s in shapes},
        "succeeded": sum(1 for r in rows if r[1] == "succeeded"),
        "requests_per_job": stats["requests"] / args.jobs,
        "polls_per_job": stats["polls"] / args.jobs,
    }
    for name, part in (("learning", lambda i: i < third), ("learned", lambda i: i >= third)):
        ok = [r for r in rows if r[1] == "succeeded" and part(order[r[0]])]
        lag = [float(r[3]) - ends[r[2]]["finishes"] for r in ok]
        polls = [r[4] for r in ok]
        result[name] = {
            "jobs": len(ok),
            "requests_per_job": 1 + sum(polls) / len(polls),
            "polls_per_job": sum(polls) / len(polls),
            "lag_p50": percentile(lag, 50),
            "lag_p95": percentile(lag, 95),
        }
    return result


def report(r: dict) -> None:
    name = "learned schedule" if r["learn"] else "configured schedule (KLING_POLL_LEARN=false)"
    print(
        f"{name}: {r['succeeded']} succeeded; all jobs: {r['requests_per_job']:.2f} API requests/job "
        f"({r['polls_per_job']:.2f} polls)",
        flush=True,
    )
    for part in ("learning", "learned"):
        p = r[part]
        print(
            f"  {part:8} ({p['jobs']} jobs): {p['requests_per_job']:.2f} requests/job, {p['polls_per_job']:.2f} "
            f"polls/job; result recorded after the task's end p50 {p['lag_p50']:.2f} s, p95 {p['lag_p95']:.2f} s",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 100 jobs per shape: a shape's first 15 to 25 jobs (one task time of arrivals) go out before
    # anything is known about it, and the first third (learning) holds them all.
    p.add_argument("--jobs", type=int, default=600)
    p.add_argument("--shapes", type=int, default=6)
    p.add_argument("--task-seconds", default="8-40", help="LOW-HIGH: a base per shape within it, ±15 %% per task")
    p.add_argument("--arrival", type=float, default=240.0, help="seconds over which the jobs arrive")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=32, help="threads per worker")
    p.add_argument("--poll-max", type=float, default=60.0, help="KLING_POLL_MAX (the learned first poll's ceiling)")
    p.add_argument("--learn", choices=("on", "off", "both"), default="both")
    p.add_argument("--broker", default=os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"))
    p.add_argument(
        "--database", default=os.environ.get("KLING_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    )
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--dump", help="append one JSON line per job (shape, task seconds, polls, lag) to this file")
    args = p.parse_args(argv)
    print(
        f"# {os.cpu_count()} cores, {args.jobs} jobs of {args.shapes} shapes over {args.arrival:g} s, "
        f"tasks {args.task_seconds} s, {args.workers} workers, KLING_POLL_MAX {args.poll_max:g}",
        flush=True,
    )
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.learn]
    with tempfile.TemporaryDirectory() as tmp:
        for learn in modes:
            r = run_polling(args, learn, Path(tmp))
            if learn == modes[0]:
                print("shapes (sandbox base seconds):", r["shapes"], flush=True)
            report(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
