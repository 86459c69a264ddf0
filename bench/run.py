"""kling-worker benchmark: real workers on RabbitMQ + PostgreSQL against the sandbox.

    python bench/run.py                       # both scenarios, 2 workers
    python bench/run.py --latency 0.3 --workers 1,2,4 --jobs 3000
    python bench/run.py --task-seconds 10 --jobs 50 --latency 0  # the polling cost
    python bench/run.py --polling             # the learned poll schedule: bench/polling.py

For each scenario it starts the sandbox (its own process), N worker processes,
and a separate producer process that enqueues the jobs with send_task, then
prints: jobs/s from enqueue to `submitted` and to `succeeded`, p50/p95/p99
latency from enqueue to `submitted` (and submission to result), API requests
per job, worker CPU per job (user+system of the worker processes from ready
to the last job's end, / jobs), peak memory per worker, duplicates, and the
rate and CPU per task of a bare Celery no-op task on the same broker and pool.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests
from kombu import Connection
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection as DbConnection

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.migrate import upgrade  # noqa: E402
from worker.dev.processes import Worker, produce  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Sandbox:
    def __init__(self, latency: float, task_seconds: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = "bench-" + uuid.uuid4().hex
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker.cli",
                "sandbox",
                "--port",
                str(self.port),
                "--api-key",
                self.key,
                "--latency",
                str(latency),
                "--task-seconds",
                str(task_seconds),
            ],
            cwd=ROOT,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                self.stats()
                return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("sandbox did not start")

    def stats(self) -> dict:
        return requests.get(self.url + "/_sandbox/stats", timeout=30).json()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def fresh_database(admin_url: str) -> tuple[str, callable]:
    name = f"kling_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + "/" + name

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))

    upgrade(url)
    return url, drop


def jobs_ended(conn: DbConnection) -> int:
    """Jobs in an end state (the benchmarks' jobs never get cancelled)."""
    ended = text("select count(*) from jobs where status in ('succeeded','failed','rejected')")
    return int(conn.execute(ended).scalar_one())


def queue_depth(broker: str, queue: str) -> int:
    with Connection(broker) as conn:
        return conn.default_channel.queue_declare(queue=queue, passive=True).message_count


def bare_celery_rate(args, workers: int, tmp: Path) -> tuple[float, float]:
    """No-op tasks/s (first enqueue until the queue is drained) and the workers' CPU seconds per task,
    on the same broker, pool and concurrency."""
    queue = f"bench-noop-{uuid.uuid4().hex[:6]}"
    env = {"CELERY_BROKER_URL": args.broker, "KLING_QUEUE": queue, "PYTHONPATH": str(ROOT / "bench")}
    procs = [Worker(env, tmp, concurrency=args.concurrency, app="noop") for _ in range(workers)]
    try:
        for w in procs:
            w.wait_ready()
        idle = sum(cpu_seconds(w.proc.pid) for w in procs)
        started = produce(args.broker, queue, [{"i": i} for i in range(args.jobs)])
        while queue_depth(args.broker, queue) > 0:
            time.sleep(0.02)
        rate = args.jobs / (time.time() - started)
        time.sleep(0.5)  # the last tasks' acks
        return rate, (sum(cpu_seconds(w.proc.pid) for w in procs) - idle) / args.jobs
    finally:
        for w in procs:
            w.stop()
        with Connection(args.broker) as conn:
            conn.default_channel.queue_delete(queue)


def scrape_phases(port: int) -> dict[str, float]:
    """CPU seconds by phase (worker.ops.cpu) from one worker's /metrics; empty from code that has none."""
    found = {}
    for line in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if line.startswith('kling_cpu_seconds_total{phase="'):
            name, value = line[len('kling_cpu_seconds_total{phase="') :].split('"}')
            found[name] = float(value)
    return found


def wait_metrics(port: int) -> None:
    for _ in range(100):
        try:
            scrape_phases(port)
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise RuntimeError(f"no metrics on port {port}")


def worker_env(broker: str, database: str, sandbox: Sandbox, queue: str, tmp: Path, concurrency: int) -> dict:
    """The environment of a benchmark's workers: this broker, database, sandbox and queue."""
    return {
        "CELERY_BROKER_URL": broker,
        "DATABASE_URL": database,
        "MODELLIX_BASE_URL": sandbox.url,
        "MODELLIX_API_KEY": sandbox.key,
        "KLING_QUEUE": queue,
        "KLING_HOME": str(tmp / "home"),
        "KLING_CONCURRENCY": str(concurrency),
    }


def metered_workers(
    env: dict,
    tmp: Path,
    workers: int,
    concurrency: int,
    beat: bool = True,
    code: Path = ROOT,
    loglevel: str = "WARNING",
) -> tuple[list[Worker], list[int]]:
    """`workers` processes (not waited for), each serving its metrics on a port of its own; with `beat`,
    the first runs the beat, as a deployment does (its sweep repairs what a worker left)."""
    ports = [free_port() for _ in range(workers)]
    procs = [
        Worker(
            {**env, "KLING_METRICS_PORT": str(port)},
            tmp,
            concurrency=concurrency,
            loglevel=loglevel,
            beat=beat and i == 0,
            root=code,
        )
        for i, port in enumerate(ports)
    ]
    return procs, ports


def wait_ready(procs: list[Worker], ports: list[int]) -> None:
    for w, port in zip(procs, ports, strict=True):
        w.wait_ready()
        wait_metrics(port)


def run_scenario(args, latency: float, workers: int, tmp: Path, code: Path = ROOT) -> dict:
    sandbox = Sandbox(latency, args.task_seconds)
    database, drop = fresh_database(args.database)
    queue = f"bench-{uuid.uuid4().hex[:6]}"
    env = worker_env(args.broker, database, sandbox, queue, tmp, args.concurrency)
    for name in ("MODELLIX_MAX_RPS", "MODELLIX_MAX_IN_FLIGHT"):
        if getattr(args, name.lower()):
            env[name] = str(getattr(args, name.lower()))
    procs, ports = metered_workers(env, tmp, workers, args.concurrency, code=code)
    try:
        wait_ready(procs, ports)
        idle = sum(cpu_seconds(w.proc.pid) for w in procs)  # start-up is not the jobs' cost
        phases_idle = [scrape_phases(port) for port in ports]
        tag = uuid.uuid4().hex[:6]
        messages = [{"request": {"prompt": f"bench {tag} {i}"}, "job_id": f"{tag}-{i}"} for i in range(args.jobs)]
        produce(args.broker, queue, messages, stamp=True)
        engine = create_engine(database)
        deadline = time.time() + args.timeout
        while time.time() < deadline:
            with engine.connect() as conn:
                done = jobs_ended(conn)
                # A job's cost ends with its outbox: the archive of its images.
                outbox = conn.execute(
                    text("select count(*) from deliveries where state in ('waiting', 'pending')")
                ).scalar_one()
            if done >= args.jobs and outbox == 0:
                break
            time.sleep(0.2)
        memory = [peak_rss_mb(w.proc.pid) for w in procs]
        cpu = sum(cpu_seconds(w.proc.pid) for w in procs) - idle
        by_phase: dict[str, float] = {}
        for port, before in zip(ports, phases_idle, strict=True):
            for name, seconds in scrape_phases(port).items():
                by_phase[name] = by_phase.get(name, 0.0) + seconds - before.get(name, 0.0)
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "select status, (metadata->>'enqueued_at')::float, extract(epoch from submitted_at),"
                    " extract(epoch from finished_at), polls from jobs"
                )
            ).all()
        engine.dispose()
        stats = sandbox.stats()
    finally:
        for w in procs:
            w.stop()
        sandbox.stop()
    drop()

    ok = [r for r in rows if r[0] == "succeeded"]
    t0 = min(r[1] for r in rows)
    submit_latency = [float(r[2]) - r[1] for r in rows if r[2] is not None]
    result_latency = [float(r[3]) - float(r[2]) for r in ok]
    return {
        "latency": latency,
        "workers": workers,
        "jobs": args.jobs,
        "succeeded": len(ok),
        "submitted_per_s": len(submit_latency) / (max(float(r[2]) for r in rows if r[2]) - t0),
        "succeeded_per_s": len(ok) / (max(float(r[3]) for r in ok) - t0) if ok else 0.0,
        "p50": percentile(submit_latency, 50),
        "p95": percentile(submit_latency, 95),
        "p99": percentile(submit_latency, 99),
        "result_p50": percentile(result_latency, 50) if ok else None,
        "result_max": max(result_latency) if ok else None,
        "polls_per_job_max": max(r[4] for r in ok) if ok else None,
        "requests_per_job": stats["requests"] / args.jobs,
        "submits_per_job": stats["submits"] / args.jobs,
        "polls_per_job": stats["polls"] / args.jobs,
        "duplicates": stats["duplicate_prompts"],
        "extra_submits": stats["submits"] - args.jobs,
        "max_rps_seen": stats["max_requests_per_second"],
        "max_unfinished_seen": stats["max_unfinished"],
        "peak_rss_mb": max(memory),
        "cpu_ms_per_job": cpu / args.jobs * 1000,
        # The rest of the CPU is Celery and kombu moving messages, thread hand-offs, timers: "consume".
        "phase_ms_per_job": (
            {"consume": (cpu - sum(by_phase.values())) / args.jobs * 1000}
            | {name: seconds / args.jobs * 1000 for name, seconds in by_phase.items()}
            if by_phase
            else {}
        ),
    }


def report(r: dict, ceiling: float | None, label: str = "") -> str:
    ratio = f" ({r['submitted_per_s'] / ceiling:.0%} of no-op)" if ceiling else ""
    lines = [
        f"{label}latency {r['latency'] * 1000:.0f} ms, {r['workers']} worker(s): "
        f"{r['submitted_per_s']:.0f} jobs/s to submitted{ratio}, "
        f"{r['succeeded_per_s']:.0f} jobs/s to succeeded ({r['succeeded']}/{r['jobs']})",
        f"  enqueue->submitted p50 {r['p50'] * 1000:.0f} ms, p95 {r['p95'] * 1000:.0f} ms, "
        f"p99 {r['p99'] * 1000:.0f} ms; submitted->result p50 {r['result_p50'] or 0:.1f} s, "
        f"max {r['result_max'] or 0:.1f} s",
        f"  API requests/job {r['requests_per_job']:.2f} (submits {r['submits_per_job']:.2f}, "
        f"polls {r['polls_per_job']:.2f}, max polls on one job {r['polls_per_job_max']}); "
        f"duplicates {r['duplicates']}, extra submits {r['extra_submits']}",
        f"  worker CPU {r['cpu_ms_per_job']:.2f} ms/job (user+system of the workers / jobs, archive included); "
        f"peak RSS per worker {r['peak_rss_mb']:.0f} MB; sandbox saw at most "
        f"{r['max_rps_seen']} requests/s and {r['max_unfinished_seen']} unfinished tasks",
    ]
    if r["phase_ms_per_job"]:
        profile = ", ".join(f"{name} {ms:.2f}" for name, ms in r["phase_ms_per_job"].items())
        lines.append(f"  CPU by phase, ms/job: {profile}")
    else:
        lines.append("  CPU by phase: not reported by this code (no kling_cpu_seconds metric)")
    return "\n".join(lines)


def main() -> int:
    # A stopped benchmark must still stop its workers and sandbox (the finally blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if "--polling" in sys.argv:  # the polling benchmark has its own options (bench/polling.py)
        from bench.polling import main as polling

        return polling([a for a in sys.argv[1:] if a != "--polling"])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--workers", default="2", help="comma-separated worker counts, e.g. 1,2,4")
    p.add_argument("--latency", default="0,0.3", help="comma-separated sandbox latencies (s)")
    p.add_argument("--task-seconds", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=128, help="threads per worker")
    p.add_argument("--max-rps", dest="modellix_max_rps", type=float)
    p.add_argument("--max-in-flight", dest="modellix_max_in_flight", type=int)
    p.add_argument("--broker", default=os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"))
    p.add_argument(
        "--database", default=os.environ.get("KLING_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    )
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument(
        "--against",
        metavar="DIR",
        help="another checkout (e.g. `git worktree add /tmp/before HEAD~3`): run each scenario on it first",
    )
    p.add_argument(
        "--deliveries",
        metavar="N,M,R",
        nargs="?",
        const="10000,1500,50",
        help="instead: broker deliveries per submitted job, backlog N, over M submits, MODELLIX_MAX_RPS=R",
    )
    args = p.parse_args()
    if args.deliveries:
        from bench.deliveries import main as deliveries

        return deliveries(args)

    print(
        f"# {os.cpu_count()} cores, {args.jobs} jobs, {args.concurrency} threads/worker, "
        f"task {args.task_seconds}s, broker {args.broker.split('@')[-1]}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        for workers in [int(w) for w in args.workers.split(",")]:
            ceiling = None
            if not args.no_baseline:
                ceiling, noop_cpu = bare_celery_rate(args, workers, Path(tmp))
                print(
                    f"bare Celery no-op, {workers} worker(s): {ceiling:.0f} tasks/s, "
                    f"worker CPU {noop_cpu * 1000:.2f} ms/task",
                    flush=True,
                )
            for latency in [float(x) for x in args.latency.split(",")]:
                if args.against:
                    # The same scenario on the other checkout first, then this one: one run, one machine.
                    before = run_scenario(args, latency, workers, Path(tmp), code=Path(args.against))
                    print(report(before, ceiling, f"[{args.against}] "), flush=True)
                r = run_scenario(args, latency, workers, Path(tmp))
                print(report(r, ceiling, "[this checkout] " if args.against else ""), flush=True)
                if args.against:
                    print(
                        f"  this checkout / {args.against}: worker CPU per job x"
                        f"{r['cpu_ms_per_job'] / before['cpu_ms_per_job']:.2f}, jobs/s to submitted x"
                        f"{r['submitted_per_s'] / before['submitted_per_s']:.2f}",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
