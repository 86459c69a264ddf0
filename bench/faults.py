"""What faults cost: the table of issue 7, measured on real RabbitMQ and PostgreSQL.

    python bench/faults.py                 # every scenario
    python bench/faults.py --only pg,rabbit --scale 0.5

Three worker processes (one also runs beat) against the sandbox (100 ms
latency, 3 s tasks). A TCP proxy of the bench's own stands between the
workers and each server, so an outage is a cut of the proxy, not a stop of
the machine's shared services. For each scenario it prints the jobs, how they
ended, the tasks orphaned (created by the API, so billed, without a job that
succeeded with them), duplicate submissions, jobs lost, and how long the batch
took to end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory

from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.migrate import upgrade  # noqa: E402
from worker.dev.jobs import audit, valid, worker_env  # noqa: E402
from worker.dev.processes import Worker, produce  # noqa: E402
from worker.dev.proxy import TcpProxy  # noqa: E402
from worker.dev.sandbox import SandboxServer, Step  # noqa: E402

PG_ADMIN = os.environ.get("KLING_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
RABBIT = os.environ.get("KLING_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")


class Run:
    """One scenario's world: a fresh database, proxies, a sandbox and three workers."""

    def __init__(self, home: Path, **env: str):
        self.db_name = f"kling_bench_{uuid.uuid4().hex[:8]}"
        self.admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.db_name}"'))
        self.pg_url = PG_ADMIN.rsplit("/", 1)[0] + "/" + self.db_name
        upgrade(self.pg_url)
        self.pg_proxy, self.rabbit_proxy = TcpProxy("127.0.0.1", 5432), TcpProxy("127.0.0.1", 5672)
        self.sandbox = SandboxServer(api_key="bench-" + uuid.uuid4().hex, task_seconds=3.0).start()
        self.sandbox.set_faults(latency=0.1)
        self.home = home
        self.env = worker_env(
            RABBIT.replace(":5672", f":{self.rabbit_proxy.port}"),
            self.pg_url.replace(":5432", f":{self.pg_proxy.port}"),
            self.sandbox,
            home,
            **env,
        )
        self.workers = [self.start(beat=(i == 0)) for i in range(3)]

    def start(self, beat: bool = False) -> Worker:
        return Worker(self.env, self.home, concurrency=16, beat=beat).wait_ready()

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.sandbox.stop()
        self.pg_proxy.close()
        self.rabbit_proxy.close()
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{self.db_name}" WITH (FORCE)'))
        self.admin.dispose()

    def rows(self) -> dict:
        from worker.dev.jobs import rows

        return rows(self.pg_url)

    def submits(self) -> int:
        return int(self.sandbox.stats()["submits"])


def batch(run: Run, jobs: int, fault: Callable[[Run], None] | None, at_submits: int) -> dict:
    messages = [valid(uuid.uuid4().hex[:6], i) for i in range(jobs)]
    started = time.monotonic()
    produce(RABBIT, run.env["KLING_QUEUE"], messages)
    if fault is not None:
        while run.submits() < at_submits:
            time.sleep(0.02)
        fault(run)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        found = run.rows()
        if not audit(run.sandbox, messages, found)["lost"]:
            break
        time.sleep(0.5)
    took = time.monotonic() - started
    result = audit(run.sandbox, messages, found)
    ended = Counter(j.status if j.status == "succeeded" else f"{j.status} {j.error_code}" for j in found.values())
    logs = "".join(w.output(10**8) for w in run.workers)
    return {
        "jobs": jobs,
        "ended": dict(ended),
        "orphaned": result["orphaned"],
        "duplicates": result["duplicates"],
        "lost": len(result["lost"]),
        "seconds": round(took, 1),
        "tracebacks": logs.count("Traceback"),
    }


def cut_for(proxy_name: str, seconds: float) -> Callable[[Run], None]:
    def fault(run: Run) -> None:
        proxy = getattr(run, proxy_name)
        proxy.cut()
        time.sleep(seconds)
        proxy.restore()

    return fault


def kill_two(run: Run) -> None:
    for victim in run.workers[1:]:
        victim.kill()
    run.workers[1:] = [run.start(), run.start()]


def stop_one(run: Run) -> None:
    leaving = run.workers.pop()
    began = time.monotonic()
    leaving.stop()
    print(f"    (warm shutdown took {time.monotonic() - began:.1f}s)", flush=True)
    run.workers.append(leaving)  # its log still counts; stop() again is harmless


def api_faults(run: Run) -> None:
    run.sandbox.set_faults(rate_429=0.2 / 3, rate_500=0.2 / 3, rate_503=0.2 / 3, retry_after=0.5)
    # 2 % of submits answered after the read timeout (the task exists; the worker cannot know).
    run.sandbox.script(*[Step("drop", on="submit") for _ in range(6)])


SCENARIOS: dict[str, tuple[str, int, dict[str, str], Callable[[Run], None] | None, float]] = {
    # name: (description, jobs, extra env, fault, fault at this share of the jobs submitted)
    "none": ("no fault", 150, {}, None, 0),
    "api": ("20% of API answers 429/500/503, 2% of submits dropped (default policy)", 300, {}, api_faults, 0),
    "api-retry": ("the same with KLING_SUBMIT_5XX=retry", 300, {"KLING_SUBMIT_5XX": "retry"}, api_faults, 0),
    "kill": ("two workers SIGKILLed, replacements started", 300, {}, kill_two, 0.3),
    "term": ("one worker SIGTERMed mid-batch", 300, {}, stop_one, 0.3),
    "rabbit": ("RabbitMQ unreachable for 5 s", 1500, {}, cut_for("rabbit_proxy", 5), 0.2),
    "pg": ("PostgreSQL unreachable for 10 s", 1500, {}, cut_for("pg_proxy", 10), 0.2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every batch size")
    args = parser.parse_args()
    print("scenario | jobs | ended | orphaned | duplicates | lost | seconds | tracebacks in logs", flush=True)
    for name in args.only.split(","):
        description, jobs, env, fault, share = SCENARIOS[name]
        jobs = max(10, int(jobs * args.scale))
        with TemporaryDirectory() as tmp:
            run = Run(Path(tmp), **env)
            if fault is api_faults:
                fault(run)
                fault = None
            try:
                r = batch(run, jobs, fault, int(jobs * share))
            finally:
                run.close()
        ended = ", ".join(f"{k}: {v}" for k, v in sorted(r["ended"].items()))
        print(
            f"{description} | {r['jobs']} | {ended} | {r['orphaned']} | {r['duplicates']} | {r['lost']} | "
            f"{r['seconds']} | {r['tracebacks']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
