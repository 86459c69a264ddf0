"""`kling-worker jobs retry`: which ended jobs may be sent again, under which new id, and why not.

A retry is a NEW job: a new id derived from the original's (`<id>:retry1`, then
`:retry2` with --force), the same request, metadata, webhook and callback, and
`retry_of` naming the original. The id is derived, not random, so running the
same retry twice before any worker has taken the first message sends the same
job id again, and the job-id guard makes that a no-op instead of a second
Modellix task.

Refused whatever the flags: a job that has not ended as failed or cancelled, a
rejected one (its request is invalid, and would be rejected again), one whose
stored request cannot be sent again (inline images are kept only as digests).
Refused unless --force: a job whose failure leaves a Modellix task possibly
alive or billed (worker.modellix.policy.task_may_exist), and a job retried already.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from marshmallow import ValidationError
from sqlalchemy.orm import Session

from models import JobStatus, store
from models.job import Job
from worker.modellix.policy import task_may_exist
from worker.schemas import GenerationRequestSchema, MessageSchema, errors_line

RETRYABLE = (JobStatus.failed, JobStatus.cancelled)
# How far along a job's retries the next free id is looked for.
MAX_RETRIES = 99
_SUFFIX = ":retry"


def retry_id(original: str, n: int) -> str:
    """The id of retry number `n` of `original`, within the 64 characters a job id may have."""
    suffix = f"{_SUFFIX}{n}"
    if len(original) + len(suffix) <= 64:
        return original + suffix
    digest = hashlib.sha256(original.encode()).hexdigest()[:8]
    return f"{original[: 64 - len(suffix) - 9]}-{digest}{suffix}"


@dataclass
class Plan:
    """One job's fate in a retry: sent again as `new_id`, or skipped for `reason`."""

    job_id: str
    status: str
    error_code: str | None
    new_id: str | None = None
    reason: str | None = None
    forced: bool = False  # sent although --force was needed
    message: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def retry(self) -> bool:
        return self.new_id is not None

    def to_dict(self, action: str) -> dict[str, Any]:
        """The report's row; `action`: retried, would retry (a dry run), not sent (the broker refused), skipped."""
        return {
            "job_id": self.job_id,
            "status": self.status,
            "error_code": self.error_code,
            "action": action,
            "new_job_id": self.new_id,
            "reason": self.reason,
        }


def refusal(job: Job) -> str | None:
    """Why this job is never retried, --force or not; None if it may be."""
    if job.status == JobStatus.rejected.value:
        return "rejected: its request is invalid, so it would be rejected again (fix it and enqueue it anew)"
    if job.status == JobStatus.succeeded.value:
        return "succeeded: nothing to retry"
    if job.status not in {s.value for s in RETRYABLE}:
        return f"still {job.status}: it has not ended"
    return None


def message_for(job: Job, new_id: str) -> tuple[dict[str, Any] | None, str | None]:
    """The `kling.generate` keyword arguments that retry `job` as `new_id`, or why there are none."""
    if _has_stored_digests(job.request):
        return None, "its inline images were stored as digests only: enqueue it again with the images"
    kwargs: dict[str, Any] = {"request": job.request, "job_id": new_id, "retry_of": job.id}
    for key, value in (("metadata", job.meta), ("webhook", job.webhook), ("callback", job.callback)):
        if value is not None:
            kwargs[key] = value
    try:
        MessageSchema().load(kwargs)
        GenerationRequestSchema().load(job.request)
    except ValidationError as exc:
        if not job.request:
            return None, "its request is not known (it was cancelled before any worker saw it)"
        return None, f"its stored request is not valid now: {errors_line(exc.messages)}"
    return kwargs, None


def _has_stored_digests(request: Any) -> bool:
    images = request.get("image_list") if isinstance(request, dict) else None
    return any(
        isinstance(item, dict) and ";sha256=" in str(item.get("image", "")).split(",", 1)[0] for item in images or []
    )


def plan(s: Session, found: list[Job], force: bool) -> list[Plan]:
    """Decide each job's fate (nothing is sent here); `s` is a session on the job table."""
    retried = store.retries_of(s, [job.id for job in found])
    plans = []
    for job in found:
        one = Plan(job.id, job.status, job.error_code)
        plans.append(one)
        one.reason = refusal(job)
        if one.reason:
            continue
        taken = _taken_retry_ids(s, job.id)
        earlier = sorted(set(retried.get(job.id, [])) | set(taken))
        blocked = []
        if earlier:
            blocked.append(f"already retried as {', '.join(earlier)}")
        ambiguous = task_may_exist(job.error_code, job.modellix_task_id)
        if ambiguous:
            blocked.append(ambiguous)
        if blocked and not force:
            one.reason = "; ".join(blocked) + " (--force to retry anyway)"
            continue
        new_id = retry_id(job.id, len(taken) + 1)
        message, why = message_for(job, new_id)
        if message is None:
            one.reason = why
            continue
        one.new_id, one.message, one.forced = new_id, message, bool(blocked)
        if blocked:
            one.reason = "forced: " + "; ".join(blocked)
    return plans


def _taken_retry_ids(s: Session, job_id: str) -> list[str]:
    """The derived retry ids of `job_id` that are jobs already, in order (a gap ends the run)."""
    candidates = [retry_id(job_id, n) for n in range(1, MAX_RETRIES + 1)]
    existing = store.existing_ids(s, candidates)
    taken = []
    for candidate in candidates:
        if candidate not in existing:
            break
        taken.append(candidate)
    return taken
