"""`kling-worker enqueue --batch FILE.jsonl`: read and check every line before anything is sent.

Each non-blank line is one JSON object: the keyword arguments a producer gives
`kling.generate` (request, and optionally job_id, metadata, webhook, callback),
checked by the same schemas the workers use. Two lines with one job_id are an
error too: the second would silently be the first job again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from marshmallow import ValidationError

from worker.schemas import GenerationRequestSchema, MessageSchema, errors_line


@dataclass(frozen=True)
class Message:
    line: int
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class BadLine:
    line: int
    error: str


def read(lines: Iterable[str]) -> tuple[list[Message], list[BadLine]]:
    """Every message of the file, and every line that is not one (with its number and errors)."""
    messages: list[Message] = []
    bad: list[BadLine] = []
    seen: dict[str, int] = {}
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        kwargs, error = _check(text)
        if error is None and kwargs is not None:
            job_id = kwargs.get("job_id")
            if isinstance(job_id, str) and job_id in seen:
                error = f"job_id {job_id!r} is also on line {seen[job_id]}"
            elif isinstance(job_id, str):
                seen[job_id] = number
        if error is not None or kwargs is None:
            bad.append(BadLine(number, error or "not a message"))
        else:
            messages.append(Message(number, kwargs))
    return messages, bad


def _check(text: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        found = json.loads(text)
    except ValueError as exc:
        return None, f"not JSON: {exc}"
    if not isinstance(found, dict):
        return None, 'not a JSON object: each line is one message, such as {"request": {"prompt": "a cat"}}'
    try:
        MessageSchema().load(found)
    except ValidationError as exc:
        if "request" not in found and "prompt" in found:  # a bare request, without its envelope
            return None, 'a request without its envelope: write {"request": {"prompt": ...}} on each line'
        return None, errors_line(exc.messages)
    try:
        GenerationRequestSchema().load(found["request"])
    except ValidationError as exc:
        return None, errors_line(exc.messages, "request")
    return found, None
