"""Broker deliveries per submitted job with a backlog under MODELLIX_MAX_RPS.

    python bench/run.py --deliveries                   # backlog 10,000, measured over 1,500 submits, 50 rps
    python bench/run.py --deliveries 3000,400,30 --workers 2 --concurrency 32

Real workers (each serving its metrics on a port of its own) take a backlog of N
messages at MODELLIX_MAX_RPS=R against the sandbox. Once M jobs are submitted it
counts how often the broker delivered a kling.generate message per submitted job
(1.0: each once; a job sent back to wait in the broker counts again): from
Celery's own "Task kling.generate[…] received" log lines (the workers log at
INFO), which any version of the code writes, and from
kling_task_runs_total{task="kling.generate"} where the code has it. Executions
still running at that moment (messages held, waiting for budget) are started but
not done, so that figure is printed both with and without them. Also the most
requests the sandbox saw in one second. Then the workers stop and the queue, the
database and the sandbox go. With bench/run.py's `--against DIR` the same
scenario runs first on another checkout.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from typing import Any

import requests
from kombu import Connection
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from bench.run import Sandbox, fresh_database, metered_workers, wait_ready, worker_env
from worker.dev.processes import ROOT, produce

# What Celery logs at INFO for each kling.generate message a worker takes from the broker.
RECEIVED = re.compile(r"Task kling\.generate\[[^\]]+\] received")


def scrape(port: int) -> dict[str, float]:
    """kling.generate's executions started and running in one worker."""
    body = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    found = {"runs": 0.0, "running": 0.0}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.labels.get("task") != "kling.generate":
                continue
            if sample.name == "kling_task_runs_total":
                found["runs"] = sample.value
            elif sample.name == "kling_tasks_in_flight":
                found["running"] = sample.value
    return found


def measure(
    broker: str,
    admin_database: str,
    tmp: Path,
    backlog: int = 10_000,
    submitted: int = 1_500,
    max_rps: float = 50,
    workers: int = 2,
    concurrency: int = 32,
    task_seconds: float = 2.0,
    timeout: float = 600,
    code: Path = ROOT,
) -> dict[str, Any]:
    sandbox = Sandbox(0.0, task_seconds)
    database, drop = fresh_database(admin_database)
    queue = f"bench-deliveries-{uuid.uuid4().hex[:6]}"
    env = worker_env(broker, database, sandbox, queue, tmp, concurrency) | {"MODELLIX_MAX_RPS": str(max_rps)}
    procs, ports = metered_workers(env, tmp, workers, concurrency, beat=False, code=code, loglevel="INFO")
    engine = create_engine(database)
    try:
        wait_ready(procs, ports)
        tag = uuid.uuid4().hex[:6]
        messages = [{"request": {"prompt": f"deliveries {tag} {i}"}, "job_id": f"{tag}-{i}"} for i in range(backlog)]
        started = produce(broker, queue, messages)
        deadline = time.time() + timeout
        done = 0
        while time.time() < deadline:
            with engine.connect() as conn:
                done = conn.execute(text("select count(*) from jobs where submitted_at is not null")).scalar_one()
            if done >= submitted:
                break
            time.sleep(0.2)
        seen = [scrape(port) for port in ports]
        with engine.connect() as conn:
            recorded = conn.execute(text("select count(*) from jobs")).scalar_one()
        received = sum(len(RECEIVED.findall(w.log.read_text(errors="replace"))) for w in procs)
        elapsed = time.time() - started
        stats = sandbox.stats()
    finally:
        engine.dispose()
        for w in procs:
            w.stop()
        with Connection(broker) as conn:
            conn.default_channel.queue_delete(queue)  # the rest of the backlog and the messages given back
        sandbox.stop()
        drop()
    runs = sum(s["runs"] for s in seen)
    running = sum(s["running"] for s in seen)
    return {
        "submitted": done,
        "seconds": elapsed,
        "received_per_job": received / max(done, 1),
        "recorded": recorded,
        "received_per_recorded": received / max(recorded, 1),
        "runs": runs,
        "running": running,
        "per_job": runs / max(done, 1),
        "finished_per_job": (runs - running) / max(done, 1),
        "max_rps_seen": stats["max_requests_per_second"],
        "requests": stats["requests"],
    }


def main(args: Any) -> int:
    """For bench/run.py --deliveries N,M,R (its --workers' first count, --concurrency, --task-seconds, --against)."""
    import tempfile

    backlog, submitted, max_rps = (float(x) for x in args.deliveries.split(","))
    workers = int(args.workers.split(",")[0])
    codes = [(Path(args.against), f"[{args.against}] ")] if args.against else []
    codes.append((ROOT, "[this checkout] " if args.against else ""))
    for code, label in codes:
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(
                args.broker,
                args.database,
                Path(tmp),
                backlog=int(backlog),
                submitted=int(submitted),
                max_rps=max_rps,
                workers=workers,
                concurrency=args.concurrency,
                task_seconds=args.task_seconds,
                timeout=args.timeout,
                code=code,
            )
        metric = (
            f"  kling.generate executions per submitted job {r['per_job']:.2f} "
            f"({r['runs']:.0f} started; {r['finished_per_job']:.2f} without the {r['running']:.0f} still running)\n"
            if r["runs"]
            else "  kling.generate executions: not counted by this code (no kling_task_runs_total)\n"
        )
        print(
            f"{label}backlog {int(backlog)}, MODELLIX_MAX_RPS={max_rps:g}, {workers} worker(s) x "
            f"{args.concurrency} threads: {r['submitted']} jobs submitted in {r['seconds']:.0f}s\n"
            f"  broker deliveries per submitted job {r['received_per_job']:.2f} (Celery's 'received' lines)\n"
            f"  broker deliveries per job in the table {r['received_per_recorded']:.2f} ({r['recorded']} jobs: "
            "a worker recorded each when it took its message; with the line, messages are taken ahead of the budget)\n"
            f"{metric}"
            f"  sandbox saw at most {r['max_rps_seen']} requests/s ({r['requests']} requests)",
            flush=True,
        )
    return 0
