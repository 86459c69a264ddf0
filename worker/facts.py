"""Answers from the API that must reach the job table, held through a database outage. No Celery here.

Once a job is claimed for a submit, whatever Modellix says next (the task id,
a rejection, a finished task) is a fact that exists nowhere else: dropping it
leaves a billed task nobody follows. `keep` writes a Fact through the
lifecycle; when the database is unreachable it holds the fact in the calling
thread and tries again, every MAX_RETRY seconds at most, until the write lands.
Memory stays bounded because a thread holds at most one fact and takes no
other work meanwhile. If the process is asked to stop first, `keep` gives the
fact back and the caller hands it on in a message (worker.wiring.tasks), so another
worker writes it. A fact travels as plain JSON for that reason (`to_json`, `from_json`):
its shape crosses the broker between versions of the worker during a rolling deploy.

Each kind of fact is a class of its own (`Fact` is their union); `write` is the one
place that turns a fact into its lifecycle move.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, ClassVar, Self, TypeAlias, assert_never, get_args

from models import JobStatus, db, lifecycle, outbox
from models.job import utcnow
from worker import backoff
from worker.ops import cpu, logs, metrics
from worker.resources import Resources

log = logging.getLogger("kling_worker.holding")

# A held fact is written again after FIRST_RETRY seconds, the wait doubling up to MAX_RETRY:
# it lands within MAX_RETRY of the database's return.
FIRST_RETRY = 0.25
MAX_RETRY = 2.0


@dataclass(frozen=True)
class _Fact:
    """What all facts share: the job, when it was learned, and how it travels (`kind`, the wire name).

    Every kind also has an `error_code` (a ClassVar None where it records none), so that a job's
    end is counted under its code whatever the kind (metrics.job_ended).
    """

    kind: ClassVar[str]
    # The status this kind of fact ends its job in; None: the job goes on.
    ends: ClassVar[JobStatus | None] = None

    job_id: str
    at: datetime

    def to_json(self) -> dict[str, Any]:
        """The wire shape: {"job_id", "kind", "at" (ISO 8601), "values" (the other fields)}."""
        return {"job_id": self.job_id, "kind": self.kind, "at": self.at.isoformat(), "values": self._values()}

    def _values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("job_id", "at")}

    @classmethod
    def _from_values(cls, job_id: str, at: datetime, values: dict[str, Any]) -> Self:
        # Values this version does not know (a newer worker's) are left out, as before.
        known = {f.name for f in fields(cls)}
        return cls(job_id, at, **{k: v for k, v in values.items() if k in known})


@dataclass(frozen=True)
class Claimed(_Fact):
    """A claim for a submit whose commit the worker never saw (the connection broke mid-statement);
    `at` is the claim's time. Nothing was sent: the claim is released."""

    kind: ClassVar[str] = "claimed"
    error_code: ClassVar[None] = None


@dataclass(frozen=True)
class Submitted(_Fact):
    """Modellix took the job as task `task_id`; its first poll is due `first_poll` seconds after `at`."""

    kind: ClassVar[str] = "submitted"
    error_code: ClassVar[None] = None

    task_id: str
    answer: dict[str, Any]
    first_poll: float


@dataclass(frozen=True)
class Requeued(_Fact):
    """A submit refused in a way worth another try: the job goes back to its place in line (`refund`:
    the attempt does not count), with the error that made it wait, if any, to be taken again `after`
    seconds from `at`."""

    kind: ClassVar[str] = "requeued"

    refund: bool
    error_code: str | None = None
    error_message: str | None = None
    after: float = 0.0

    def _values(self) -> dict[str, Any]:
        # As every version has written it: the error only when there is one.
        values: dict[str, Any] = {"refund": self.refund}
        if self.error_code is not None:
            values.update(error_code=self.error_code, error_message=self.error_message)
        if self.after:
            values["after"] = self.after
        return values


@dataclass(frozen=True)
class SubmitFailed(_Fact):
    """A submit that fails the job (refused for good, or its outcome unknown)."""

    kind: ClassVar[str] = "submit_failed"
    ends: ClassVar[JobStatus | None] = JobStatus.failed

    error_code: str
    error_message: str


@dataclass(frozen=True)
class Succeeded(_Fact):
    """The task succeeded with `result_urls`; with `files` and `archived`, its images were archived first."""

    kind: ClassVar[str] = "succeeded"
    ends: ClassVar[JobStatus | None] = JobStatus.succeeded
    error_code: ClassVar[None] = None

    result_urls: list[str]
    answer: dict[str, Any]
    files: list[dict[str, Any]] | None = None
    archived: outbox.Archived | None = None

    def _values(self) -> dict[str, Any]:
        archived = self.archived.to_json() if self.archived else None
        return {"result_urls": self.result_urls, "answer": self.answer, "files": self.files, "archived": archived}

    @classmethod
    def _from_values(cls, job_id: str, at: datetime, values: dict[str, Any]) -> Self:
        archived = outbox.Archived.from_json(values["archived"]) if values.get("archived") else None
        return cls(job_id, at, values["result_urls"], values["answer"], values.get("files"), archived)


@dataclass(frozen=True)
class TaskFailed(_Fact):
    """The task failed, ended without results, or is gone (`answer`: Modellix's, if it said anything)."""

    kind: ClassVar[str] = "task_failed"
    ends: ClassVar[JobStatus | None] = JobStatus.failed

    error_code: str
    error_message: str
    answer: dict[str, Any] | None = None


# What the API said about a job (or a claim not seen to commit), to be written to its row.
Fact: TypeAlias = Claimed | Submitted | Requeued | SubmitFailed | Succeeded | TaskFailed

_BY_KIND: dict[str, type[Fact]] = {cls.kind: cls for cls in get_args(Fact)}


def from_json(data: dict[str, Any]) -> Fact:
    """The fact a fact's `to_json` wrote (in this version or an earlier one)."""
    cls = _BY_KIND.get(data["kind"])
    if cls is None:
        raise ValueError(f"unknown kind of fact {data['kind']!r}")
    return cls._from_values(data["job_id"], datetime.fromisoformat(data["at"]), dict(data["values"]))


class Kept(enum.Enum):
    """What `keep` did with a fact."""

    # The job table has it: written now, or the job had already moved past it.
    written = "written"
    # The process began to stop before the database came back: the caller hands the fact on.
    to_hand_on = "to_hand_on"


@cpu.timed("record")
def keep(res: Resources, fact: Fact) -> Kept:
    """Write `fact`, holding it through an outage: `Kept.written` once the job table has it,
    `Kept.to_hand_on` if the process began to stop before the database came back."""
    task_id = fact.task_id if isinstance(fact, Submitted) else None
    with logs.bound(job_id=fact.job_id, modellix_task_id=task_id):
        return _keep(res, fact)


def _keep(res: Resources, fact: Fact) -> Kept:
    outage = res.outage
    failure = _write(res, fact)
    if failure is None:
        return Kept.written
    outage.defer("answers", failure)
    outage.holding(+1)
    try:
        wait = FIRST_RETRY
        while not res.stopping.wait(wait):
            failure = _write(res, fact)
            if failure is None:
                return Kept.written
            outage.still(failure)
            wait = backoff.delay(2, base=wait, cap=MAX_RETRY)  # the last wait doubled
        return Kept.written if _write(res, fact) is None else Kept.to_hand_on
    finally:
        outage.holding(-1)


def _write(res: Resources, fact: Fact) -> Exception | None:
    """One try: None if written, the outage's error if the database is unreachable."""
    try:
        # A job's end is written with its outbox rows, in one transaction (models.outbox).
        with res.atomic() if fact.ends is not None else res.statement() as ex:
            moved = write(ex, fact)
    except Exception as exc:
        if not db.unreachable(exc):
            raise
        return exc
    if moved and fact.ends is not None:
        metrics.job_ended(fact.ends.value, fact.error_code)
    if not moved and isinstance(fact, Submitted):
        # Either this answer was written before (a message carrying it came twice), or the sweep
        # gave up on the job first (the answer came later than KLING_SUBMIT_GRACE): say which task.
        log.warning(
            "job %s: Modellix task %s was not recorded now: the job had already moved on "
            "(recorded before, or failed as interrupted)",
            fact.job_id,
            fact.task_id,
            extra={"event": "answer_not_recorded"},
        )
    return None


def write(ex: db.Executor, fact: Fact) -> bool:
    """The lifecycle move the fact stands for; False if the job had already moved on."""
    match fact:
        case Claimed(job_id, at):
            return lifecycle.release_claim(ex, job_id, at, utcnow())
        case Submitted(job_id, at, task_id, answer, first_poll):
            next_poll_at = at + timedelta(seconds=first_poll)
            return lifecycle.mark_submitted(ex, job_id, at, task_id=task_id, answer=answer, next_poll_at=next_poll_at)
        case Requeued(job_id, at, refund, code, message, after):
            due_at = at + timedelta(seconds=after) if after else None
            return lifecycle.requeue(
                ex, job_id, at, refund=refund, error_code=code, error_message=message, due_at=due_at
            )
        case SubmitFailed(job_id, at, code, message):
            return lifecycle.fail_submit(ex, job_id, at, code, message)
        case Succeeded(job_id, at, urls, answer, files, archived):
            return lifecycle.succeed(ex, job_id, at, result_urls=urls, answer=answer, files=files, archived=archived)
        case TaskFailed(job_id, at, code, message, answer):
            return lifecycle.fail_task(ex, job_id, at, code, message, answer)
        case _:
            assert_never(fact)
