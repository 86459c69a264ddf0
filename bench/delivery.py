"""What result delivery costs: from a job's end to its verified webhook, and deliveries per event.

    python bench/delivery.py                 # 300 jobs, 3 workers, a receiver failing 10 % at first
    python bench/delivery.py --jobs 1000 --fail 0

Real RabbitMQ and PostgreSQL, three worker processes (one runs beat), the
sandbox (100 ms latency, 3 s tasks) and a webhook receiver that verifies each
delivery with the `standardwebhooks` package. Every job asks for a webhook and
its images are archived to a folder. Prints the delay from the job's end
(`finished_at`, when a worker saw the task end) to the event's first delivery
and to its first 200, as p50/p95/max, and the deliveries per event.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
import uuid
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from faults import RABBIT, Run  # noqa: E402  (bench/ is on the path as the script's folder)

from worker.dev.jobs import valid  # noqa: E402
from worker.dev.processes import produce  # noqa: E402
from worker.dev.receiver import WebhookReceiver  # noqa: E402

SECRET = "whsec_" + base64.b64encode(b"kling-worker delivery bench key!").decode()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--fail", type=float, default=0.1, help="share of events whose first delivery fails")
    args = parser.parse_args()
    with TemporaryDirectory() as tmp, WebhookReceiver(SECRET) as receiver:
        receiver.fail_next(int(args.jobs * args.fail), how="500")
        run = Run(Path(tmp), KLING_WEBHOOK_SECRET=SECRET, KLING_ARCHIVE=(Path(tmp) / "kept").as_uri())
        try:
            tag = uuid.uuid4().hex[:6]
            messages = [dict(valid(tag, i), webhook=receiver.url()) for i in range(args.jobs)]
            started = time.monotonic()
            produce(RABBIT, run.env["KLING_QUEUE"], messages)
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                ok = {d.headers["webhook-id"] for d in receiver.deliveries() if d.status == 200}
                if len(ok) >= args.jobs:
                    break
                time.sleep(0.5)
            took = time.monotonic() - started
            rows = run.rows()
        finally:
            run.close()
        deliveries = receiver.deliveries()
    by_job: dict[str, list] = {}
    for d in deliveries:
        by_job.setdefault(json.loads(d.body)["job_id"], []).append(d)
    first, delivered = [], []
    for job_id, got in by_job.items():
        ended = rows[job_id].finished_at.timestamp()
        first.append(min(d.received_at for d in got) - ended)
        delivered.append(min(d.received_at for d in got if d.status == 200) - ended)
    files = sum(len(r.files or []) for r in rows.values())
    print(
        f"{args.jobs} jobs with a webhook, {files} images archived, {took:.1f}s from the first enqueue to the last 200"
    )
    for name, values in (("job end -> first delivery", first), ("job end -> first 200", delivered)):
        print(
            f"{name:<27} p50 {percentile(values, 50):.2f}s  p95 {percentile(values, 95):.2f}s  max {max(values):.2f}s"
        )
    print(f"deliveries per event: {len(deliveries) / len(by_job):.2f} ({len(deliveries)} for {len(by_job)} events)")
    print(f"all verified: {all(d.verified for d in deliveries)}")


if __name__ == "__main__":
    main()
