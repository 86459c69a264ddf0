"""The embedded default end to end: SQLite, the file broker, the sandbox, a worker, beat.

Everything runs on this machine with no server installed. The worker runs as
a real `celery -A worker worker` process, exactly as in production, only the
environment differs.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

from models import TERMINAL, store
from worker import resources
from worker.cli.watch import watch
from worker.config import home
from worker.dev.sandbox import SandboxServer, png


def example_jobs(run: str, sandbox_url: str) -> list[tuple[str, dict[str, Any]]]:
    inline = "data:image/png;base64," + base64.b64encode(png(2, 2)).decode()
    return [
        (
            f"demo-{run}-url",
            {
                "prompt": "A watercolour of <<<image_1>>> at dawn",
                "image_list": [{"image": f"{sandbox_url}/results/example/0.png"}],
                "aspect_ratio": "16:9",
            },
        ),
        (
            f"demo-{run}-inline",
            {
                "prompt": "The same scene as a pencil sketch: <<<image_1>>>",
                "image_list": [{"image": inline}],
                "n": 2,
                "resolution": "2k",
            },
        ),
        (f"demo-{run}-elements", {"prompt": "A product shot on marble", "element_list": [{"element_id": 42}]}),
        (f"demo-{run}-invalid", {"prompt": "Refers to <<<image_3>>>", "n": 12, "negative_prompt": "blur"}),
    ]


def _wait_for_archives(job_ids: list[str], timeout: float) -> dict[str, list[dict[str, Any]]]:
    """The archived files of these jobs, once the workers have kept them (a sweep after each end)."""
    deadline = time.monotonic() + timeout
    found: dict[str, list[dict[str, Any]]] = {}
    while time.monotonic() < deadline:
        with resources.get().transaction() as s:
            found = {j.id: j.files for j in store.find_jobs(s, job_ids) if j.files}
        if len(found) == len(job_ids):
            break
        time.sleep(0.3)
    return found


def run(timeout: float = 120.0) -> int:
    from models.migrate import upgrade

    os.environ.setdefault("KLING_HOME", str(home()))
    upgrade(resources.settings().database_url)
    api_key = "demo-" + secrets.token_hex(8)
    sandbox = SandboxServer(api_key=api_key, task_seconds=3.0).start()
    env = dict(
        os.environ, MODELLIX_BASE_URL=sandbox.url, MODELLIX_API_KEY=api_key, KLING_POLL_FIRST="1", KLING_CONCURRENCY="8"
    )
    print(
        f"sandbox Modellix API at {sandbox.url}; broker {resources.settings().broker_url}; "
        f"database {resources.settings().database_url}"
    )
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker",
            "--quiet",
            "worker",
            "-B",
            "--loglevel=WARNING",
            "--without-mingle",
            "--without-gossip",
        ],
        env=env,
    )
    try:
        from worker.wiring.app import app, prepare_folders

        prepare_folders()

        ids = []
        for job_id, request in example_jobs(uuid.uuid4().hex[:6], sandbox.url):
            app.send_task(
                "kling.generate", kwargs={"request": request, "job_id": job_id, "metadata": {"source": "demo"}}
            )
            ids.append(job_id)
            print(f"enqueued {job_id}")
        rows = watch(ids, timeout, sys.stdout)
        archived = _wait_for_archives([r["id"] for r in rows.values() if r["status"] == "succeeded"], 30.0)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
        sandbox.stop()

    print()
    for row in rows.values():
        outcome = row["result_urls"] if row["status"] == "succeeded" else f"{row['error_code']}: {row['error_message']}"
        print(f"{row['id']:<22} {row['status']:<10} {outcome}")
    for job_id, files in archived.items():
        for found in files:
            where = found["uri"] or f"not archived ({found['error']})"
            print(f"{job_id:<22} kept    {where}")
    if archived:
        print(f"\nthe images stay in {resources.settings().archive} ('kling-worker results get ID' copies them)")
    finished = all(row["status"] in TERMINAL for row in rows.values()) and len(rows) == len(ids)
    print("\nall jobs reached an end state" if finished else "\nsome jobs did not finish in time")
    return 0 if finished else 1
