"""`kling-worker enqueue`: one job from the command line, or a file of them (--batch), and --wait."""

from __future__ import annotations

import base64
import mimetypes
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import click
from kombu.exceptions import OperationalError

from models import TERMINAL
from worker import resources
from worker.cli import batch, printing
from worker.cli.params import JSON_OBJECT, UsageError, given, require_database
from worker.cli.watch import watch, why_queued
from worker.schemas import ASPECT_RATIOS, RESOLUTIONS

# The options that describe the one job a PROMPT makes; a --batch file says all that per line.
_SINGLE = (
    "image",
    "element",
    "resolution",
    "aspect_ratio",
    "n",
    "job_id",
    "metadata",
    "tenant",
    "priority",
    "no_check",
)


@click.command()
@click.argument("prompt", required=False)
@click.option("--image", multiple=True, help="An http(s) URL or a local .png/.jpg file (repeat for more).")
@click.option("--element", type=int, multiple=True, help="An element id (repeat for more).")
@click.option("--resolution", type=click.Choice(RESOLUTIONS))
@click.option("--aspect-ratio", type=click.Choice(ASPECT_RATIOS))
@click.option("-n", "n", type=int, help="Images to generate (1-9).")
@click.option("--job-id", help="Your idempotency key (default: the Celery task id).")
@click.option("--metadata", type=JSON_OBJECT, help="A JSON object stored with the job.")
@click.option("--tenant", help="Whose job it is: 1-64 characters of [A-Za-z0-9._-] (default: default).")
@click.option("--priority", type=int, help="0 (last) to 9 (first) within the tenant's line (default: 5).")
@click.option("--no-check", is_flag=True, help="Skip the local validation (the worker still validates).")
@click.option(
    "--batch",
    "batch_file",
    type=click.File("r", encoding="utf-8"),
    metavar="FILE.jsonl",
    help="One message per line (the kwargs of kling.generate); every line is checked before any is sent.",
)
@click.option("--wait", is_flag=True, help="Show the jobs' progress until they end.")
@click.option("--timeout", type=click.FloatRange(min=0), default=900.0, show_default=True, help="With --wait.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def enqueue(
    ctx: click.Context,
    prompt: str | None,
    image: tuple[str, ...],
    element: tuple[int, ...],
    resolution: str | None,
    aspect_ratio: str | None,
    n: int | None,
    job_id: str | None,
    metadata: dict[str, Any] | None,
    tenant: str | None,
    priority: int | None,
    no_check: bool,
    batch_file: IO[str] | None,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> int:
    """Send a generation job (PROMPT), or every job of a JSONL file (--batch), to the queue.

    \b
    kling-worker enqueue "A cat like <<<image_1>>>" --image cat.png -n 2 --wait
    kling-worker enqueue --batch jobs.jsonl --json
    A line of jobs.jsonl: {"request": {"prompt": "a cat"}, "job_id": "cat-1", "metadata": {"k": 1}}
    """
    if batch_file is not None:
        if prompt is not None:
            raise click.UsageError("give a PROMPT or --batch FILE, not both", ctx)
        mixed = given(ctx, *_SINGLE)
        if mixed:
            raise click.UsageError(f"{', '.join(mixed)}: not with --batch (each line says it for its job)", ctx)
        return _enqueue_batch(batch_file, wait, timeout, as_json)
    if prompt is None:
        raise click.UsageError("give a PROMPT, or --batch FILE.jsonl", ctx)
    request = build_request(prompt, image, element, resolution=resolution, aspect_ratio=aspect_ratio, n=n)
    kwargs: dict[str, Any] = {"request": request}
    if job_id:
        kwargs["job_id"] = job_id
    if metadata is not None:
        kwargs["metadata"] = metadata
    if tenant is not None:
        kwargs["tenant"] = tenant
    if priority is not None:
        kwargs["priority"] = priority
    if not no_check:
        from worker.schemas import GenerationRequestSchema, MessageSchema

        MessageSchema().load(kwargs)
        GenerationRequestSchema().load(request)
    sent = send([kwargs])[0]
    if as_json and not wait:
        printing.as_json({"job_id": sent})
    elif not as_json:
        print(sent, flush=True)
    if not wait:
        return 0
    rows = _wait([sent], timeout)
    row = rows.get(sent)
    if row is None or row["status"] not in TERMINAL:
        printing.say(f"{sent}: not finished after {timeout:.0f}s")
        if as_json:
            printing.as_json(row or {"id": sent, "status": "queued"})
        return 1
    if as_json:
        printing.as_json(row)
    else:
        printing.job(row)
    return 0 if row["status"] == "succeeded" else 1


def build_request(
    prompt: str,
    images: Sequence[str] = (),
    elements: Sequence[int] = (),
    *,
    resolution: str | None = None,
    aspect_ratio: str | None = None,
    n: int | None = None,
) -> dict[str, Any]:
    request: dict[str, Any] = {"prompt": prompt}
    if images:
        request["image_list"] = [{"image": _image(value)} for value in images]
    if elements:
        request["element_list"] = [{"element_id": value} for value in elements]
    for key, value in (("resolution", resolution), ("aspect_ratio", aspect_ratio), ("n", n)):
        if value is not None:
            request[key] = value
    return request


def _image(value: str) -> str:
    """URLs pass through; a local file becomes a data URI."""
    if "://" in value or value.startswith("data:"):
        return value
    path = Path(value)
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if mime not in ("image/png", "image/jpeg"):  # the only inline images the API takes (worker.schemas)
        raise UsageError(f"--image {value}: not a .png, .jpg or .jpeg file; give one, or an http(s) URL")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--image {value}: {exc.strerror or exc}") from None
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def send(messages: Sequence[dict[str, Any]]) -> list[str]:
    """Send `kling.generate` messages; the job ids, in order. A broker error after some were sent
    raises PartlySent with the ids sent so far."""
    from worker.wiring.app import app, prepare_folders

    prepare_folders()
    queue = resources.settings().queue
    sent: list[str] = []
    for kwargs in messages:
        try:
            result = app.send_task("kling.generate", kwargs=kwargs, queue=queue)
        except (OperationalError, OSError) as exc:
            raise PartlySent(sent, exc) from exc
        sent.append(kwargs.get("job_id") or result.id)
    return sent


class PartlySent(Exception):
    """The broker refused a message: `sent` went before it, nothing after it."""

    def __init__(self, sent: list[str], cause: Exception):
        super().__init__(f"the broker refused the message ({cause}); is CELERY_BROKER_URL right?")
        self.sent = sent
        self.cause = cause


def _wait(ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    require_database()
    return watch(ids, timeout, sys.stderr, hints=why_queued)


def _enqueue_batch(file: IO[str], wait: bool, timeout: float, as_json: bool) -> int:
    name = getattr(file, "name", "the file")
    messages, bad = batch.read(file)
    if bad:
        for found in bad:
            printing.say(f"kling-worker: {name} line {found.line}: {found.error}")
        lines = "line is" if len(bad) == 1 else "lines are"
        raise UsageError(f"{len(bad)} {lines} not valid messages; nothing was sent")
    if not messages:
        raise UsageError(f"{name} holds no message; nothing was sent")
    try:
        ids = send([m.kwargs for m in messages])
    except PartlySent as partly:
        if partly.sent:
            _print_sent(messages, partly.sent, as_json)
        refused = messages[len(partly.sent)].line
        printing.say(
            f"kling-worker: the broker refused line {refused} ({partly.cause}); "
            f"{len(partly.sent)} of {len(messages)} sent, none after it"
        )
        return 1 if partly.sent else 2
    if not wait:
        _print_sent(messages, ids, as_json)
        return 0
    if not as_json:
        _print_sent(messages, ids, as_json)
    rows = _wait(ids, timeout)
    ended = [rows.get(i) or {"id": i, "status": "queued"} for i in ids]
    if as_json:
        printing.as_json(ended)
    else:
        printing.table(["id", "status", "error_code"], [(r["id"], r["status"], r.get("error_code")) for r in ended])
    unfinished = sum(1 for r in ended if r["status"] not in TERMINAL)
    if unfinished:
        printing.say(f"{unfinished} of {len(ids)} jobs not finished after {timeout:.0f}s")
    return 0 if all(r["status"] == "succeeded" for r in ended) else 1


def _print_sent(messages: Sequence[batch.Message], ids: Sequence[str], as_json: bool) -> None:
    pairs = list(zip([m.line for m in messages], ids, strict=False))
    if as_json:
        printing.as_json([{"line": line, "job_id": job_id} for line, job_id in pairs])
    else:
        printing.table(["line", "job_id"], pairs)
