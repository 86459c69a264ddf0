"""Answers from the API that must reach the job table, held through a database outage. No Celery here.

Once a job is claimed for a submit, whatever Modellix says next (the task id,
a rejection, a finished task) is a fact that exists nowhere else: dropping it
leaves a billed task nobody follows. `keep` writes a Fact through the
lifecycle; when the database is unreachable it holds the fact in the calling
thread and tries again, every MAX_RETRY seconds at most, until the write lands.
Memory stays bounded because a thread holds at most one fact and takes no
other work meanwhile. If the process is asked to stop first, `keep` gives the
fact back and the caller hands it on in a message (worker.wiring.tasks), so another
worker writes it. A Fact is plain JSON for that reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from models import JobStatus, db, lifecycle, outbox
from models.job import utcnow
from worker import resources
from worker.ops import cpu, logs, metrics

log = logging.getLogger("kling_worker.holding")

# A held fact is written again after FIRST_RETRY seconds, the wait doubling up to MAX_RETRY:
# it lands within MAX_RETRY of the database's return.
FIRST_RETRY = 0.25
MAX_RETRY = 2.0

# "claimed": a claim whose commit the worker never saw (at = the claim's time); the rest are the API's answers.
KINDS = frozenset({"claimed", "submitted", "requeued", "submit_failed", "succeeded", "task_failed"})
# The kinds that end a job, and the status they end it in.
ENDS = {"submit_failed": JobStatus.failed, "succeeded": JobStatus.succeeded, "task_failed": JobStatus.failed}


@dataclass(frozen=True)
class Fact:
    """What the API said about a job (`kind`, one of KINDS), at `at`, with the values the row records."""

    job_id: str
    kind: str
    at: datetime
    values: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind of fact {self.kind!r}")

    def to_json(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "kind": self.kind, "at": self.at.isoformat(), "values": self.values}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fact:
        return cls(data["job_id"], data["kind"], datetime.fromisoformat(data["at"]), dict(data["values"]))


@cpu.timed("record")
def keep(fact: Fact) -> Fact | None:
    """Write `fact`, holding it through an outage: None once written (or found already superseded);
    the fact itself if the process began to stop before the database came back."""
    with logs.bound(job_id=fact.job_id, modellix_task_id=fact.values.get("task_id")):
        return _keep(fact)


def _keep(fact: Fact) -> Fact | None:
    outage = resources.get().outage
    failure = _write(fact)
    if failure is None:
        return None
    outage.defer("answers", failure)
    outage.holding(+1)
    try:
        wait = FIRST_RETRY
        while not resources.get().stopping.wait(wait):
            failure = _write(fact)
            if failure is None:
                return None
            outage.still(failure)
            wait = min(MAX_RETRY, wait * 2)
        return None if _write(fact) is None else fact
    finally:
        outage.holding(-1)


def _write(fact: Fact) -> Exception | None:
    """One try: None if written, the outage's error if the database is unreachable."""
    res = resources.get()
    try:
        # A job's end is written with its outbox rows, in one transaction (models.outbox).
        with res.atomic() if fact.kind in ENDS else res.statement() as ex:
            moved = write(ex, fact)
    except Exception as exc:
        if not db.unreachable(exc):
            raise
        return exc
    if moved and fact.kind in ENDS:
        metrics.job_ended(ENDS[fact.kind].value, fact.values.get("error_code"))
    if not moved and fact.kind == "submitted":
        # Either this answer was written before (a message carrying it came twice), or the sweep
        # gave up on the job first (the answer came later than KLING_SUBMIT_GRACE): say which task.
        log.warning(
            "job %s: Modellix task %s was not recorded now: the job had already moved on "
            "(recorded before, or failed as interrupted)",
            fact.job_id,
            fact.values["task_id"],
            extra={"event": "answer_not_recorded"},
        )
    return None


def write(ex: db.Executor, fact: Fact) -> bool:
    """The lifecycle move the fact stands for; False if the job had already moved on."""
    v, at = fact.values, fact.at
    if fact.kind == "claimed":
        return lifecycle.release_claim(ex, fact.job_id, at, utcnow())
    if fact.kind == "submitted":
        return lifecycle.mark_submitted(
            ex,
            fact.job_id,
            at,
            task_id=v["task_id"],
            answer=v["answer"],
            next_poll_at=at + timedelta(seconds=v["first_poll"]),
        )
    if fact.kind == "requeued":
        code, message = v.get("error_code"), v.get("error_message")
        return lifecycle.requeue(ex, fact.job_id, at, refund=v["refund"], error_code=code, error_message=message)
    if fact.kind == "submit_failed":
        return lifecycle.fail_submit(ex, fact.job_id, at, v["error_code"], v["error_message"])
    if fact.kind == "succeeded":
        archived = outbox.Archived.from_json(v["archived"]) if v.get("archived") else None
        return lifecycle.succeed(
            ex,
            fact.job_id,
            at,
            result_urls=v["result_urls"],
            answer=v["answer"],
            files=v.get("files"),
            archived=archived,
        )
    return lifecycle.fail_task(ex, fact.job_id, at, v["error_code"], v["error_message"], v.get("answer"))
