"""`kling-worker jobs …` and `results get`: query the job table, cancel, redeliver, retry and prune jobs."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from models import TERMINAL, JobStatus, lifecycle, outbox, retention, store
from models.job import utcnow
from models.outbox import Channel
from worker import resources
from worker.cli import printing, retry_plan
from worker.cli.enqueue import PartlySent, send
from worker.cli.params import WHEN, UsageError, given, require_database

STATUSES = click.Choice([s.value for s in JobStatus])
ENDED = click.Choice(sorted(s.value for s in TERMINAL))


@click.group()
def jobs() -> None:
    """Query and manage the job table."""


@jobs.command("list")
@click.option("--status", type=STATUSES)
@click.option("--error-code", help="Only jobs that ended with this error code (such as task_failed, timeout).")
@click.option("--since", type=WHEN, help="ISO time or an age such as 30m, 2h, 1d.")
@click.option("--until", type=WHEN, help="ISO time or an age.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(
    status: str | None,
    error_code: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    as_json: bool,
) -> int:
    """Recent jobs, newest first."""
    require_database()
    with resources.get().transaction() as s:
        rows = [j.to_dict() for j in store.list_jobs(s, status, since, until, limit, error_code)]
    if as_json:
        printing.as_json(rows)
        return 0
    columns = ("id", "status", "modellix_task_id", "attempts", "created_at", "error_code")
    printing.table(columns, [[(r[c] or "")[:19] if c == "created_at" else r[c] for c in columns] for r in rows])
    return 0


@jobs.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(job_id: str, as_json: bool) -> int:
    """One job in full: its request, result, files, deliveries, and the job it retries or its retries."""
    require_database()
    with resources.get().transaction() as s:
        job = store.get_job(s, job_id)
        row = job.to_dict() if job else None
        if job is not None and row is not None:
            if job.status == JobStatus.queued.value:
                row["place_in_line"] = store.place_in_line(s, job.tenant, job.line)
            row["deliveries"] = [d.to_dict() for d in outbox.for_job(s, job_id)] or None
            row["retried_as"] = store.retries_of(s, [job_id]).get(job_id)
    if row is None:
        printing.say(
            f"job {job_id}: not seen by any worker yet (its message may still be on the broker, or no job has this id)"
        )
        return 1
    if as_json:
        printing.as_json(row)
    else:
        printing.job(row)
    return 0


@jobs.command()
@click.option("--by", type=click.Choice(["tenant"]), help="Count each tenant's jobs apart.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(by: str | None, as_json: bool) -> int:
    """Jobs by status, the fleet's limits, the tasks in flight and any fleet pause."""
    from worker.cli import fleet

    require_database()
    res = resources.get()
    with res.transaction() as s:
        if by == "tenant":
            per_tenant = store.count_by_tenant(s)
        counts = store.count_by_status(s)
        budget = fleet.status(res.settings, s)
    if by == "tenant":
        return _stats_by_tenant(per_tenant, as_json)
    if as_json:
        printing.as_json({"jobs": counts, "budget": budget})
        return 0
    pairs: list[tuple[str, Any]] = [(status, count) for status, count in sorted(counts.items())]
    pairs += [
        ("total", sum(counts.values())),
        ("max rps", budget["max_rps"] or "unlimited"),
        ("in flight", f"{budget['in_flight']} of {budget['max_in_flight'] or 'unlimited'}"),
    ]
    if budget["paused_for"]:
        pairs.append(("paused", f"{budget['paused_for']}s more: {budget['pause_reason']}"))
    printing.fields(pairs, sep="  ")
    return 0


def _stats_by_tenant(counts: dict[str, dict[str, int]], as_json: bool) -> int:
    if as_json:
        printing.as_json(counts)
        return 0
    statuses = [s.value for s in JobStatus]
    rows = [
        [tenant, *(by_status.get(s, 0) for s in statuses), sum(by_status.values())]
        for tenant, by_status in counts.items()
    ]
    printing.table(("tenant", *statuses, "total"), rows)
    return 0


@jobs.command()
@click.argument("job_id")
def cancel(job_id: str) -> int:
    """Cancel a job that is queued, or that no worker has seen yet."""
    require_database()
    with resources.get().transaction() as s:
        if lifecycle.cancel(s, job_id, utcnow()):
            printing.say("cancelled")
            return 0
        if lifecycle.cancel_unseen(s, job_id, utcnow()):
            printing.say(
                f"{job_id}: not seen by any worker yet; recorded as cancelled, so its message is "
                "acknowledged without submitting when a worker takes it"
            )
            return 0
        job = store.get_job(s, job_id)
        status = job.status if job else "unknown"
    printing.say(f"{job_id}: {status}, not queued, not cancelled")
    return 1


@jobs.command()
@click.argument("job_id")
def redeliver(job_id: str) -> int:
    """Send an ended job's event again (webhook and callback)."""
    require_database()
    with resources.get().transaction() as s:
        again = outbox.again(s, job_id, [Channel.webhook, Channel.callback], utcnow())
    if not again:
        printing.say(f"{job_id}: no webhook or callback delivery that has ended; nothing to send again")
        return 1
    printing.say(f"{job_id}: {again} delivery(ies) due again; a worker sends them within a sweep")
    return 0


@jobs.command()
@click.argument("job_id", required=False)
@click.option(
    "--status", type=click.Choice(["failed", "cancelled"]), default="failed", show_default=True, help="Which jobs."
)
@click.option("--since", type=WHEN, help="Created since: ISO time or an age such as 1h.")
@click.option("--until", type=WHEN, help="Created before: ISO time or an age.")
@click.option("--error-code", help="Only jobs that failed with this code (such as 429, timeout, task_failed).")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, help="At most this many jobs.")
@click.option(
    "--force",
    is_flag=True,
    help="Also retry jobs whose Modellix task may exist (submit_unknown, submit_interrupted, a 5xx, "
    "a timeout: a second task may be billed) and jobs retried already.",
)
@click.option("--dry-run", is_flag=True, help="Say what would be sent; send nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def retry(
    ctx: click.Context,
    job_id: str | None,
    status: str,
    since: datetime | None,
    until: datetime | None,
    error_code: str | None,
    limit: int,
    force: bool,
    dry_run: bool,
    as_json: bool,
) -> int:
    """Send failed jobs again as NEW jobs (id JOB_ID:retry1), linked to the original by retry_of.

    One JOB_ID, or the jobs a filter selects (default: failed, newest first, at most 100).
    Never resent without --force: a job whose submit or task may have created a billed
    Modellix task, or one retried already. Never resent: a rejected job (invalid request),
    or one whose inline images were stored as digests only.
    """
    filters = given(ctx, "status", "since", "until", "error_code", "limit")
    if job_id is not None and filters:
        raise click.UsageError(f"give a JOB_ID or filters ({', '.join(filters)}), not both", ctx)
    require_database()
    with resources.get().transaction() as s:
        if job_id is not None:
            one = store.get_job(s, job_id)
            if one is None:
                printing.say(f"job {job_id}: no such job")
                return 1
            found = [one]
        else:
            found = store.list_jobs(s, status, since, until, limit, error_code)
        plans = retry_plan.plan(s, found, force)
    sent = _send_retries(plans) if not dry_run else set()
    report = [p.to_dict(_action(p, sent, dry_run)) for p in plans]
    if as_json:
        printing.as_json(report)
    else:
        columns = ("job_id", "status", "error_code", "action", "new_job_id", "reason")
        printing.table(columns, [[r[c] for c in columns] for r in report])
    skipped = sum(1 for p in plans if not p.retry)
    if dry_run:
        printing.say(f"dry run: {sum(1 for p in plans if p.retry)} would be retried, {skipped} skipped; nothing sent")
    else:
        unsent = sum(1 for p in plans if p.retry and p.job_id not in sent)
        printing.say(f"{len(sent)} retried, {skipped} skipped" + (f", {unsent} not sent" if unsent else ""))
        if unsent:
            return 1
    if not plans:
        printing.say("no job matches")
    return 1 if job_id is not None and skipped else 0


def _action(plan: retry_plan.Plan, sent: set[str], dry_run: bool) -> str:
    if not plan.retry:
        return "skipped"
    if dry_run:
        return "would retry"
    return "retried" if plan.job_id in sent else "not sent"


def _send_retries(plans: list[retry_plan.Plan]) -> set[str]:
    """Send each planned retry; the original ids whose retry went out. A broker error stops the rest."""
    todo = [p for p in plans if p.retry]
    try:
        send([p.message for p in todo])
    except PartlySent as partly:
        done = {p.job_id for p in todo[: len(partly.sent)]}
        for p in todo[len(partly.sent) :]:
            p.reason = f"not sent: the broker refused it ({partly.cause})"
        return done
    return {p.job_id for p in todo}


@jobs.command()
@click.option(
    "--before",
    type=WHEN,
    required=True,
    help="Jobs that ended (last changed) before this: ISO time or an age such as 30d.",
)
@click.option("--status", type=ENDED, multiple=True, help="Only these ended statuses (repeat; default: all).")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@click.option(
    "--batch-size", type=click.IntRange(1, 10_000), default=retention.BATCH, show_default=True, help="Jobs per delete."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def prune(before: datetime, status: tuple[str, ...], dry_run: bool, batch_size: int, as_json: bool) -> int:
    """Delete ended jobs older than --before, with their deliveries (the outbox).

    Jobs whose webhook or callback is still being delivered are kept. Archived images
    are NOT deleted: they stay in KLING_ARCHIVE.
    """
    if before > datetime.now(UTC):
        raise UsageError(f"--before {before.isoformat()} is in the future: nothing has ended after now")
    require_database()
    chosen = [JobStatus(s) for s in status]
    res = resources.get()
    if dry_run:
        with res.transaction() as s:
            found = retention.count(s, before, chosen)
    else:
        found = retention.Pruned()
        while True:
            with res.transaction() as s:
                done = retention.prune_batch(s, before, chosen, batch_size)
            found.add(done)
            if done.total < batch_size:
                break
        with res.transaction() as s:
            found.kept = retention.kept(s, before, chosen)
    archive = res.settings.archive
    if as_json:
        printing.as_json(
            {
                "dry_run": dry_run,
                "before": before.isoformat(),
                "jobs": found.jobs,
                "total": found.total,
                "deliveries": found.deliveries,
                "kept_with_deliveries_due": found.kept,
                "archived_files_deleted": False,
                "archive": archive,
            }
        )
        return 0
    verb = "would delete" if dry_run else "deleted"
    rows: list[list[Any]] = [[s, n] for s, n in sorted(found.jobs.items())] + [["total", found.total]]
    printing.table(["status", verb], rows)
    printing.say(f"{verb} {found.total} job(s) ended before {before.isoformat(timespec='seconds')}")
    printing.say(f"{verb} {found.deliveries} delivery row(s) of those jobs")
    if found.kept:
        printing.say(f"kept {found.kept} ended job(s) whose webhook or callback is still being delivered")
    printing.say(f"archived images are not deleted: they stay in KLING_ARCHIVE ({archive})")
    return 0


@click.group()
def results() -> None:
    """A job's archived images."""


@results.command("get")
@click.argument("job_id")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Folder to write to (default: ./JOB_ID).")
def results_get(job_id: str, out: Path | None) -> int:
    """Copy a job's archived images to a folder, checked against their sha256."""
    from worker.results import archive

    require_database()
    with resources.get().transaction() as s:
        job = store.get_job(s, job_id)
        files = list(job.files or []) if job else None
    if files is None:
        printing.say(f"job {job_id}: not seen by any worker yet")
        return 1
    kept = [f for f in files if f and f.get("uri")]
    if not kept:
        printing.say(f"job {job_id}: no archived images")
        return 1
    folder = out or Path(job_id)
    folder.mkdir(parents=True, exist_ok=True)
    for found in kept:
        data = archive.read(found["uri"])
        if hashlib.sha256(data).hexdigest() != found["sha256"]:
            printing.say(f"{found['uri']}: its digest does not match the one recorded")
            return 1
        target = folder / Path(found["uri"]).name
        target.write_bytes(data)
        print(target)
    return 0
