"""`kling-worker`: enqueue jobs, query the job table, run migrations, the sandbox and the demo."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import mimetypes
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from marshmallow import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from models import TERMINAL, JobStatus, db, lifecycle, outbox, store
from models.job import utcnow
from models.outbox import Channel
from worker import outages, runtime
from worker.config import ConfigError, home
from worker.watch import watch

_AGO = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class UsageError(Exception):
    """A mistake of the person at the keyboard: one line, exit 2, no traceback."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if getattr(args, "reads_jobs", False):
            _require_database()
        code: int = args.func(args)
        return code
    except ValidationError as exc:
        print(json.dumps(exc.messages, indent=2, ensure_ascii=False), file=sys.stderr)
        return 2
    except (UsageError, ConfigError) as exc:
        print(f"kling-worker: {exc}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        # Not migrated, or not reachable: the operator's to fix, said in one line.
        print(
            f"kling-worker: the job database is not usable ({outages.reason(exc)}); "
            "is DATABASE_URL right, and has `kling-worker db upgrade` run?",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130


def _require_database() -> None:
    """A command that reads the job table, run where no embedded database exists (another folder,
    another KLING_HOME), says so instead of creating an empty one and failing on its missing table."""
    path = db.sqlite_file(runtime.settings().database_url)
    if path is not None and not path.exists():
        raise UsageError(
            f"no job database at {path}: run this where the service runs, set KLING_HOME or "
            "DATABASE_URL to its database, or create one with `kling-worker db upgrade`"
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kling-worker", description=__doc__)
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    e = sub.add_parser("enqueue", help="send one generation job to the queue")
    e.add_argument("prompt")
    e.add_argument("--image", action="append", default=[], help="http(s) URL or local .png/.jpg file (repeat)")
    e.add_argument("--element", action="append", type=int, default=[], help="element id (repeat)")
    e.add_argument("--resolution", choices=["1k", "2k"])
    e.add_argument("--aspect-ratio")
    e.add_argument("-n", type=int, help="images to generate (1-9)")
    e.add_argument("--job-id", help="idempotency key; default: the Celery task id")
    e.add_argument("--metadata", type=_json_object, help="JSON object stored with the job")
    e.add_argument("--no-check", action="store_true", help="skip local validation (the worker still validates)")
    e.add_argument("--wait", action="store_true", help="show progress until the job ends")
    e.add_argument("--timeout", type=float, default=900.0, help="with --wait: give up after this many seconds")
    e.set_defaults(func=cmd_enqueue)

    jobs = sub.add_parser("jobs", help="query the job table").add_subparsers(required=True, metavar="ACTION")
    ls = jobs.add_parser("list", help="recent jobs, newest first")
    ls.add_argument("--status", choices=[s.value for s in JobStatus])
    ls.add_argument("--since", type=_when, help="ISO time or an age such as 30m, 2h, 1d")
    ls.add_argument("--until", type=_when, help="ISO time or an age")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(reads_jobs=True, func=cmd_list)
    show = jobs.add_parser("show", help="one job in full")
    show.add_argument("job_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(reads_jobs=True, func=cmd_show)
    stats = jobs.add_parser("stats", help="counts by status")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(reads_jobs=True, func=cmd_stats)
    cancel = jobs.add_parser("cancel", help="cancel a job that has not been submitted yet")
    cancel.add_argument("job_id")
    cancel.set_defaults(reads_jobs=True, func=cmd_cancel)
    redeliver = jobs.add_parser("redeliver", help="send an ended job's event again (webhook and callback)")
    redeliver.add_argument("job_id")
    redeliver.set_defaults(reads_jobs=True, func=cmd_redeliver)

    results = sub.add_parser("results", help="a job's archived images").add_subparsers(required=True, metavar="ACTION")
    get = results.add_parser("get", help="copy a job's archived images to a folder")
    get.add_argument("job_id")
    get.add_argument("--out", type=Path, help="folder to write to (default: ./<job id>)")
    get.set_defaults(reads_jobs=True, func=cmd_results_get)

    db = sub.add_parser("db", help="database").add_subparsers(required=True, metavar="ACTION")
    db.add_parser("upgrade", help="apply the Alembic migrations").set_defaults(func=cmd_db_upgrade)

    sb = sub.add_parser("sandbox", help="run the sandbox Modellix server")
    sb.add_argument("--host", default="127.0.0.1")
    sb.add_argument("--port", type=int, default=8080)
    sb.add_argument("--api-key", default=None, help="default: MODELLIX_API_KEY or 'sandbox-key'")
    sb.add_argument("--task-seconds", type=float, default=2.0)
    sb.add_argument("--latency", type=float, default=0.0)
    sb.add_argument("--rate-429", type=float, default=0.0)
    sb.add_argument("--rate-500", type=float, default=0.0)
    sb.add_argument("--rate-503", type=float, default=0.0)
    sb.add_argument("--fail-rate", type=float, default=0.0)
    sb.set_defaults(func=cmd_sandbox)

    wk = sub.add_parser("worker", help="run a worker and the sweep here (embedded defaults unless configured)")
    wk.add_argument("--sandbox", action="store_true", help="also run the sandbox API and point the worker at it")
    wk.add_argument("--concurrency", type=int, help="threads (default: KLING_CONCURRENCY)")
    wk.set_defaults(func=cmd_worker)

    doctor = sub.add_parser("doctor", help="check the broker, the database, the API, the key and the balance")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(func=cmd_doctor)

    demo = sub.add_parser("demo", help="run the whole service embedded (SQLite, file broker, sandbox)")
    demo.add_argument("--timeout", type=float, default=120.0)
    demo.set_defaults(func=cmd_demo)
    return p


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any] = {"prompt": args.prompt}
    if args.image:
        request["image_list"] = [{"image": _image(value)} for value in args.image]
    if args.element:
        request["element_list"] = [{"element_id": value} for value in args.element]
    for key, value in (("resolution", args.resolution), ("aspect_ratio", args.aspect_ratio), ("n", args.n)):
        if value is not None:
            request[key] = value
    return request


def _image(value: str) -> str:
    """URLs pass through; a local file becomes a data URI."""
    if "://" in value or value.startswith("data:"):
        return value
    path = Path(value)
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--image {value}: {exc.strerror or exc}") from None
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _json_object(value: str) -> dict[str, Any]:
    try:
        found = json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(found, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, such as '{\"order\": 7}'")
    return found


def cmd_enqueue(args: argparse.Namespace) -> int:
    from worker.app import app, prepare_folders
    from worker.schemas import GenerationRequestSchema, MessageSchema

    request = build_request(args)
    kwargs: dict[str, Any] = {"request": request}
    if args.job_id:
        kwargs["job_id"] = args.job_id
    if args.metadata is not None:
        kwargs["metadata"] = args.metadata
    if not args.no_check:
        MessageSchema().load(kwargs)
        GenerationRequestSchema().load(request)
    prepare_folders()
    result = app.send_task("kling.generate", kwargs=kwargs, queue=runtime.settings().queue)
    job_id = args.job_id or result.id
    print(job_id)
    if args.wait:
        return _wait(job_id, args.timeout)
    return 0


def _wait(job_id: str, timeout: float) -> int:
    row = watch([job_id], timeout, sys.stderr).get(job_id)
    if row and row["status"] in TERMINAL:
        _print_job(row)
        return 0 if row["status"] == "succeeded" else 1
    print(f"{job_id}: not finished after {timeout:.0f}s", file=sys.stderr)
    return 1


def _when(value: str) -> datetime:
    match = _AGO.match(value)
    if match:
        return datetime.now(UTC) - timedelta(**{_UNITS[match[2]]: int(match[1])})
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError("not an ISO time or an age such as 30m, 2h, 1d") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def cmd_list(args: argparse.Namespace) -> int:
    with runtime.get().transaction() as s:
        rows = [j.to_dict() for j in store.list_jobs(s, args.status, args.since, args.until, args.limit)]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    columns = ("id", "status", "modellix_task_id", "attempts", "created_at", "error_code")
    table = [[str(r[c] or "") if c != "created_at" else (r[c] or "")[:19] for c in columns] for r in rows]
    widths = [max([len(c)] + [len(t[i]) for t in table]) for i, c in enumerate(columns)]
    for line in [list(columns)] + table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with runtime.get().transaction() as s:
        job = store.get_job(s, args.job_id)
        row = job.to_dict() if job else None
        if row is not None:
            row["deliveries"] = [d.to_dict() for d in outbox.for_job(s, args.job_id)] or None
    if row is None:
        print(
            f"job {args.job_id}: not seen by any worker yet (its message may still be on the broker, "
            "or no job has this id)",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(row, indent=2, ensure_ascii=False))
    else:
        _print_job(row)
    return 0


def _print_job(row: dict[str, Any]) -> None:
    for key, value in row.items():
        if key in ("last_response", "files", "deliveries") or value is None:
            continue
        shown = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value
        print(f"{key:>17}: {shown}")
    for index, found in enumerate(row.get("files") or []):
        kept = f"{found['uri']} ({found['content_type']}, {found['bytes']} bytes)" if found.get("uri") else None
        print(f"{f'file {index}':>17}: {kept or 'not archived: ' + str(found.get('error'))}")
    for d in row.get("deliveries") or []:
        state = f"{d['state']} after {d['attempts']} attempt(s)"
        print(f"{d['channel']:>17}: {state}" + (f"; last error: {d['last_error']}" if d["last_error"] else ""))


def cmd_stats(args: argparse.Namespace) -> int:
    from worker import limits

    with runtime.get().transaction() as s:
        counts = store.count_by_status(s)
        budget = limits.status(s)
    if args.json:
        print(json.dumps({"jobs": counts, "budget": budget}))
        return 0
    for status, count in sorted(counts.items()):
        print(f"{status:>13}  {count}")
    print(f"{'total':>13}  {sum(counts.values())}")
    print(f"{'max rps':>13}  {budget['max_rps'] or 'unlimited'}")
    print(f"{'in flight':>13}  {budget['in_flight']} of {budget['max_in_flight'] or 'unlimited'}")
    if budget["paused_for"]:
        print(f"{'paused':>13}  {budget['paused_for']}s more: {budget['pause_reason']}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with runtime.get().transaction() as s:
        if lifecycle.cancel(s, args.job_id, utcnow()):
            print("cancelled", file=sys.stderr)
            return 0
        if lifecycle.cancel_unseen(s, args.job_id, utcnow()):
            print(
                f"{args.job_id}: not seen by any worker yet; recorded as cancelled, so its message is "
                "acknowledged without submitting when a worker takes it",
                file=sys.stderr,
            )
            return 0
        job = store.get_job(s, args.job_id)
        status = job.status if job else "unknown"
    print(f"{args.job_id}: {status}, not queued, not cancelled", file=sys.stderr)
    return 1


def cmd_redeliver(args: argparse.Namespace) -> int:
    with runtime.get().transaction() as s:
        again = outbox.again(s, args.job_id, [Channel.webhook, Channel.callback], utcnow())
    if not again:
        print(f"{args.job_id}: no webhook or callback delivery that has ended; nothing to send again", file=sys.stderr)
        return 1
    print(f"{args.job_id}: {again} delivery(ies) due again; a worker sends them within a sweep", file=sys.stderr)
    return 0


def cmd_results_get(args: argparse.Namespace) -> int:
    from worker import archive

    with runtime.get().transaction() as s:
        job = store.get_job(s, args.job_id)
        files = list(job.files or []) if job else None
    if files is None:
        print(f"job {args.job_id}: not seen by any worker yet", file=sys.stderr)
        return 1
    kept = [(i, f) for i, f in enumerate(files) if f and f.get("uri")]
    if not kept:
        print(f"job {args.job_id}: no archived images", file=sys.stderr)
        return 1
    out: Path = args.out or Path(args.job_id)
    out.mkdir(parents=True, exist_ok=True)
    for _, found in kept:
        data = archive.read(found["uri"])
        if hashlib.sha256(data).hexdigest() != found["sha256"]:
            print(f"{found['uri']}: its digest does not match the one recorded", file=sys.stderr)
            return 1
        target = out / Path(found["uri"]).name
        target.write_bytes(data)
        print(target)
    return 0


def cmd_db_upgrade(_args: argparse.Namespace) -> int:
    from models.migrate import upgrade

    upgrade(runtime.settings().database_url)
    print("database is at the latest revision", file=sys.stderr)
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    from worker.dev.sandbox import Faults, SandboxServer

    faults = Faults(
        latency=args.latency,
        rate_429=args.rate_429,
        rate_500=args.rate_500,
        rate_503=args.rate_503,
        fail_rate=args.fail_rate,
    )
    key = args.api_key or runtime.settings().api_key or "sandbox-key"
    server = SandboxServer(args.host, args.port, api_key=key, task_seconds=args.task_seconds, faults=faults)
    print(f"sandbox Modellix API on http://{args.host}:{args.port}", file=sys.stderr)
    server.serve_forever()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """One worker with the sweep (celery worker -B), on whatever the environment says: after
    `make demo`, this is how a newcomer keeps a worker running and enqueues jobs to it."""
    import os
    import subprocess

    from models.migrate import upgrade

    cfg = runtime.settings()
    upgrade(cfg.database_url)
    env = dict(os.environ)
    sandbox = None
    if args.sandbox:
        from worker.dev.sandbox import SandboxServer

        key = cfg.api_key or "sandbox-key"
        sandbox = SandboxServer(api_key=key).start()
        env.update(MODELLIX_BASE_URL=sandbox.url, MODELLIX_API_KEY=key)
        print(
            f"sandbox Modellix API at {sandbox.url} (key {'from MODELLIX_API_KEY' if cfg.api_key else 'sandbox-key'})"
        )
    base = env.get("MODELLIX_BASE_URL") or cfg.base_url
    print(f"worker: broker {cfg.broker_url}; database {cfg.database_url}; API {base}", flush=True)
    cmd = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-B", "--loglevel=INFO"]
    cmd += [f"--schedule={Path(home()) / 'celerybeat-schedule'}"]
    if args.concurrency:
        cmd += [f"--concurrency={args.concurrency}"]
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.wait()  # Celery got the same Ctrl-C and shuts down warmly
        return 130
    finally:
        if sandbox is not None:
            sandbox.stop()


def cmd_doctor(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from worker import doctor

    checks = doctor.run()
    if args.json:
        print(json.dumps([asdict(check) for check in checks]))
    else:
        width = max(len(check.name) for check in checks)
        for check in checks:
            print(f"{'ok' if check.ok else 'FAIL':<4}  {check.name:<{width}}  {check.detail}")
    return 0 if all(check.ok for check in checks) else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.dev.demo import run

    return run(args.timeout)


if __name__ == "__main__":
    sys.exit(main())
