"""`kling-worker tenants …`: each tenant's policy (weight, caps), kept in the job database so that every
worker on every host follows it, and what each tenant has waiting and in flight."""

from __future__ import annotations

from typing import Any

import click

from models import tenants
from models.job import utcnow
from worker import resources
from worker.cli import printing
from worker.cli.params import UsageError, require_database
from worker.schemas import TENANT_PATTERN

CLEARABLE = ("max_in_flight", "max_rps")


@click.group("tenants")
def tenants_() -> None:
    """Tenants' policies: their share of the fleet's budget (weights) and caps of their own."""


@tenants_.command("set")
@click.argument("name")
@click.option("--weight", type=click.FloatRange(min=0, min_open=True), help="Share of the fleet's turns (default 1).")
@click.option("--max-in-flight", type=click.IntRange(min=1), help="At most this many of its tasks in flight.")
@click.option("--max-rps", type=click.FloatRange(min=0, min_open=True), help="At most this many submits a second.")
@click.option(
    "--clear",
    type=click.Choice(["max-in-flight", "max-rps"]),
    multiple=True,
    help="Take a cap away (repeat for both).",
)
def set_(
    name: str, weight: float | None, max_in_flight: int | None, max_rps: float | None, clear: tuple[str, ...]
) -> int:
    """Set NAME's policy; what is not given stays as it was. Workers follow it from their next turn."""
    if not TENANT_PATTERN.match(name):
        raise UsageError(f"{name!r}: a tenant is 1-64 characters of [A-Za-z0-9._-]")
    cleared = tuple(c.replace("-", "_") for c in clear)
    both = [c for c in cleared if {"max_in_flight": max_in_flight, "max_rps": max_rps}[c] is not None]
    if both:
        raise UsageError(f"--{both[0].replace('_', '-')}: given and cleared at once")
    require_database()
    with resources.get().transaction() as s:
        tenants.set_policy(
            s, name, utcnow(), weight=weight, max_in_flight=max_in_flight, max_rps=max_rps, clear=cleared
        )
    printing.say(f"tenant {name}: policy set")
    return 0


@tenants_.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(as_json: bool) -> int:
    """Every tenant with a policy or with jobs waiting or in flight: its policy, queued and in flight."""
    require_database()
    with resources.get().transaction() as s:
        rows = listing(s)
    if as_json:
        printing.as_json(rows)
        return 0
    columns = ("tenant", "weight", "max_in_flight", "max_rps", "queued", "in_flight")
    printing.table(columns, [[r[c] if r[c] is not None else "-" for c in columns] for r in rows])
    return 0


def listing(ex: Any) -> list[dict[str, Any]]:
    """Per tenant: its policy (defaults where it has none), its queued jobs and its jobs in flight."""
    found: dict[str, dict[str, Any]] = {}

    def row(name: str) -> dict[str, Any]:
        return found.setdefault(
            name,
            {"tenant": name, "weight": 1.0, "max_in_flight": None, "max_rps": None, "queued": 0, "in_flight": 0},
        )

    for policy in tenants.policies(ex):
        row(policy.name).update(weight=policy.weight, max_in_flight=policy.max_in_flight, max_rps=policy.max_rps)
    for line in tenants.in_line(ex):
        row(line.tenant).update(queued=line.queued, in_flight=line.in_flight)
    return [found[name] for name in sorted(found)]
