"""What the CLI's options accept, checked by click before any command runs, and the user's mistakes.

A value that does not fit is click's BadParameter, which `worker.cli.main`
turns into one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from models import db
from worker import resources

_AGO = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class UsageError(Exception):
    """A mistake of the person at the keyboard found while a command runs: one line, exit 2, no traceback."""


def when(value: str) -> datetime:
    """An ISO time (UTC unless it says otherwise) or an age counted back from now: 30s, 15m, 2h, 1d."""
    match = _AGO.match(value.strip())
    if match:
        return datetime.now(UTC) - timedelta(**{_UNITS[match[2]]: int(match[1])})
    parsed = datetime.fromisoformat(value.strip())  # ValueError if it is neither
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class When(click.ParamType[datetime, Any]):
    name = "TIME|AGE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return when(str(value))
        except ValueError:
            self.fail(f"{value!r} is not an ISO time or an age such as 30m, 2h, 1d", param, ctx)


class JsonObject(click.ParamType[dict[str, Any], Any]):
    name = "JSON"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        try:
            found = json.loads(value)
        except ValueError as exc:
            self.fail(f"not JSON: {exc}", param, ctx)
        if not isinstance(found, dict):
            self.fail("must be a JSON object, such as '{\"order\": 7}'", param, ctx)
        return found


WHEN = When()
JSON_OBJECT = JsonObject()


def require_database() -> None:
    """A command that reads the job table, run where no embedded database exists (another folder,
    another KLING_HOME), says so instead of creating an empty one and failing on its missing table."""
    path = db.sqlite_file(resources.settings().database_url)
    if path is not None and not path.exists():
        raise UsageError(
            f"no job database at {path}: run this where the service runs, set KLING_HOME or "
            "DATABASE_URL to its database, or create one with `kling-worker db upgrade`"
        )


def given(ctx: click.Context, *names: str) -> list[str]:
    """Which of these options the user gave (not their defaults), as they would type them."""
    params = {param.name: param for param in ctx.command.params}
    chosen = []
    for name in names:
        source = ctx.get_parameter_source(name)
        if source is not None and source is not click.core.ParameterSource.DEFAULT:
            chosen.append(params[name].opts[0])
    return chosen
