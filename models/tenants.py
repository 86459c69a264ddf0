"""The ``tenants`` table: each tenant's policy (set by an operator) and its share of the fleet so far.

One row per tenant that has a policy or has had a job taken from the line. A tenant without a
row has weight 1 and no caps of its own. The fair-share rule that reads and moves `vtime`
lives in worker.fleet.share; this module is its SQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import Float, Integer, String, Table, bindparam, case, func, select
from sqlalchemy.orm import Mapped, mapped_column

from models.db import Executor
from models.job import IN_FLIGHT, Base, JobStatus, UTCDateTime
from models.store import dialect_insert, jobs


class Tenant(Base):
    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    weight: Mapped[float] = mapped_column(Float, default=1.0, server_default="1")
    # Caps of its own, fleet-wide (None: none).
    max_in_flight: Mapped[int | None] = mapped_column(Integer)
    max_rps: Mapped[float | None] = mapped_column(Float)
    # Its virtual time: the fair-share clock's reading at its next turn (worker.fleet.share).
    vtime: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    # Its own rate limit's next free slot (epoch seconds), as the fleet's in api_budget.
    next_slot: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


tenants = cast(Table, Tenant.__table__)


@dataclass(frozen=True)
class Waiting:
    """A tenant with queued jobs due now: its policy, its share so far and its places in flight."""

    name: str
    weight: float
    max_in_flight: int | None
    max_rps: float | None
    vtime: float
    next_slot: float
    in_flight: int


def set_policy(
    ex: Executor,
    name: str,
    now: datetime,
    *,
    weight: float | None = None,
    max_in_flight: int | None = None,
    max_rps: float | None = None,
    clear: tuple[str, ...] = (),
) -> None:
    """Create or change a tenant's policy: the values given change, the names in `clear` go back to
    none (a cap), the others stay."""
    changes: dict[str, Any] = {"updated_at": now}
    if weight is not None:
        changes["weight"] = weight
    if max_in_flight is not None:
        changes["max_in_flight"] = max_in_flight
    if max_rps is not None:
        changes["max_rps"] = max_rps
    changes.update({name: None for name in clear})
    insert = dialect_insert(ex, tenants).values(name=name, **changes)
    ex.execute(insert.on_conflict_do_update(index_elements=[tenants.c.name], set_=changes))


def policies(ex: Executor) -> list[Any]:
    """Every tenant row, by name."""
    return list(ex.execute(select(tenants).order_by(tenants.c.name)))


def _waiting_stmt() -> Any:
    due = (jobs.c.due_at.is_(None)) | (jobs.c.due_at <= bindparam("now", type_=jobs.c.due_at.type))
    lined = select(jobs.c.tenant).where(jobs.c.status == JobStatus.queued.value, due).distinct().subquery()
    flying = jobs.alias("flying")
    in_flight = (
        select(func.count())
        .where(flying.c.tenant == lined.c.tenant, flying.c.status.in_([s.value for s in IN_FLIGHT]))
        .scalar_subquery()
    )
    return (
        select(
            lined.c.tenant,
            tenants.c.weight,
            tenants.c.max_in_flight,
            tenants.c.max_rps,
            tenants.c.vtime,
            tenants.c.next_slot,
            case((tenants.c.max_in_flight.is_not(None), in_flight), else_=0).label("in_flight"),
        )
        .select_from(lined)
        .outerjoin(tenants, tenants.c.name == lined.c.tenant)
        .order_by(lined.c.tenant)
    )


# Built once: it runs at every turn.
_WAITING = _waiting_stmt()


def waiting(ex: Executor, now: datetime) -> list[Waiting]:
    """The tenants with queued jobs due at `now`, with their policy (defaults where they have no row),
    their virtual time and, for those with an in-flight cap, their jobs in flight (0 for the others:
    counting them would read every job in flight at each turn)."""
    return [
        Waiting(
            name=r.tenant,
            weight=r.weight if r.weight is not None else 1.0,
            max_in_flight=r.max_in_flight,
            max_rps=r.max_rps,
            vtime=r.vtime or 0.0,
            next_slot=r.next_slot or 0.0,
            in_flight=r.in_flight or 0,
        )
        for r in ex.execute(_WAITING, {"now": now})
    ]


def took_turn(ex: Executor, name: str, now: datetime, *, vtime: float, next_slot: float | None) -> None:
    """Record a tenant's turn: its new virtual time, and its rate limit's next slot if it has one."""
    values: dict[str, Any] = {"vtime": vtime}
    if next_slot is not None:
        values["next_slot"] = next_slot
    insert = dialect_insert(ex, tenants).values(name=name, updated_at=now, **values)
    ex.execute(insert.on_conflict_do_update(index_elements=[tenants.c.name], set_=values))


class InLine(NamedTuple):
    """A tenant's jobs in the line (queued, due or not) and holding a place at Modellix (in flight)."""

    tenant: str
    queued: int
    in_flight: int


def in_line(ex: Executor) -> list[InLine]:
    """Per tenant with any, by name: its queued jobs and its jobs in flight (`tenants list`, doctor, the metrics)."""
    queued = jobs.c.status == JobStatus.queued.value
    stmt = (
        select(
            jobs.c.tenant,
            func.sum(case((queued, 1), else_=0)),
            func.sum(case((queued, 0), else_=1)),
        )
        .where(jobs.c.status.in_([JobStatus.queued.value, *(s.value for s in IN_FLIGHT)]))
        .group_by(jobs.c.tenant)
        .order_by(jobs.c.tenant)
    )
    return [InLine(tenant, int(q), int(f)) for tenant, q, f in ex.execute(stmt)]
