"""The fleet's shared API budget: one row that every worker on every host reads and locks."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Float, Row, String, Table, Text, func, select, update
from sqlalchemy.orm import Mapped, mapped_column

from models.db import Executor
from models.job import IN_FLIGHT, Base
from models.store import jobs


class ApiBudget(Base):
    __tablename__ = "api_budget"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    # GCRA: the time (epoch seconds) of the next free request slot. Each request
    # takes the slot and moves it on by 1/MODELLIX_MAX_RPS.
    next_slot: Mapped[float] = mapped_column(Float, default=0.0)
    # After a 429 (or 401/402), nobody in the fleet calls the API before this.
    paused_until: Mapped[float] = mapped_column(Float, default=0.0)
    pause_reason: Mapped[str | None] = mapped_column(Text)
    # The fair-share clock: the virtual time of the last turn a tenant was given (worker.fleet.share).
    fair_clock: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")


# -- its SQL (the rules that use it live in worker.fleet) ---------------------------

NAME = "modellix"
_budget = cast(Table, ApiBudget.__table__)


def lock(ex: Executor) -> Row[Any]:
    """Lock the budget row until the caller's transaction ends, and read it."""
    row = ex.execute(select(_budget).where(_budget.c.name == NAME).with_for_update()).first()
    if row is None:
        raise RuntimeError("api_budget row missing: run `kling-worker db upgrade`")
    return row


def book_slot(ex: Executor, next_slot: float) -> None:
    """Move the next free request slot on (the row must be locked)."""
    ex.execute(update(_budget).where(_budget.c.name == NAME).values(next_slot=next_slot))


def set_fair_clock(ex: Executor, value: float) -> None:
    """Move the fair-share clock (the row must be locked)."""
    ex.execute(update(_budget).where(_budget.c.name == NAME).values(fair_clock=value))


def pause_until(ex: Executor, until: float, reason: str) -> None:
    """Pause the fleet until `until` (epoch seconds), unless a longer pause is already set."""
    ex.execute(
        update(_budget)
        .where(_budget.c.name == NAME, _budget.c.paused_until < until)
        .values(paused_until=until, pause_reason=reason)
    )


def lift_pause(ex: Executor, reason: str) -> bool:
    """End the pause now if it is still the one for `reason`; a pause set since for another reason stays."""
    result = ex.execute(
        update(_budget).where(_budget.c.name == NAME, _budget.c.pause_reason == reason).values(paused_until=0.0)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]  # an UPDATE's CursorResult


def read(ex: Executor) -> Row[Any] | None:
    return ex.execute(select(_budget).where(_budget.c.name == NAME)).first()


def count_in_flight(ex: Executor, up_to: int | None = None) -> int:
    """Jobs submitting or submitted and not finished; counting stops at `up_to`."""
    busy = select(jobs.c.id).where(jobs.c.status.in_([s.value for s in IN_FLIGHT]))
    if up_to is not None:
        busy = busy.limit(up_to)
    return int(ex.execute(select(func.count()).select_from(busy.subquery())).scalar_one())
