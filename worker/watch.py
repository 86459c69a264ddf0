"""Following jobs in the table until they end, printing each change: `enqueue --wait` and the demo."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, TextIO

from models import TERMINAL, store
from worker import runtime


def watch(ids: list[str], timeout: float, out: TextIO) -> dict[str, dict[str, Any]]:
    """Follow jobs until all have ended (or `timeout`); their rows as dicts."""
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    rows: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        with runtime.get().transaction() as s:
            rows = {j.id: j.to_dict() for j in store.find_jobs(s, ids)}
        for job_id in ids:
            status = rows[job_id]["status"] if job_id in rows else "queued"  # no row until a worker takes it
            if seen.get(job_id) != status:
                seen[job_id] = status
                print(f"{datetime.now():%H:%M:%S} {job_id:<22} {status}", file=out, flush=True)
        if len(rows) == len(ids) and all(r["status"] in TERMINAL for r in rows.values()):
            break
        time.sleep(0.3)
    return rows
