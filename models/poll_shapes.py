"""What the fleet learned about how long tasks of each request shape take: one row per shape.

Every worker reads the rows into its own copy every few seconds and merges
what it observed since into them in one statement (worker.polling.learning). The
rule that moves F is worker.polling.schedule's; this module only stores and adds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, Float, Integer, String, Table, case, literal, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapped, mapped_column

from models.db import Executor
from models.job import Base, UTCDateTime


class PollShape(Base):
    __tablename__ = "poll_shapes"

    resolution: Mapped[str] = mapped_column(String(8), primary_key=True)
    n: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Input images: image_list and element_list items together.
    images: Mapped[int] = mapped_column(Integer, primary_key=True)
    # ln(seconds) of the learned first poll: in log space, the updates of all workers add up.
    log_first: Mapped[float] = mapped_column(Float)
    # First polls on the learned schedule that found the task finished / still running.
    hits: Mapped[int] = mapped_column(Integer, default=0)
    misses: Mapped[int] = mapped_column(Integer, default=0)
    # Jobs on the configured schedule whose durations seeded log_first when the row was made.
    seeded: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


_shapes = cast(Table, PollShape.__table__)
Key = tuple[str, int, int]  # (resolution, n, images)


@dataclass(frozen=True)
class Seen:
    """One worker's observations of a shape since its last merge."""

    key: Key
    log_seed: float  # the row's log_first if none exists yet
    seeded: int  # jobs that log_seed comes from (0: log_seed is the first poll those jobs used)
    hits: int
    misses: int


def read(ex: Executor) -> dict[Key, float]:
    """Every shape's log_first."""
    rows = ex.execute(select(_shapes.c.resolution, _shapes.c.n, _shapes.c.images, _shapes.c.log_first))
    return {(r[0], r[1], r[2]): float(r[3]) for r in rows}


def merge(
    ex: Executor, seen: Iterable[Seen], moved: Any, max_step: float, low: float, high: float, now: datetime
) -> None:
    """Add observations to the shared rows, in one statement.

    A new shape's row starts at its seed; an existing row keeps its value and
    moves by `moved(hits, misses)` (worker.polling.schedule.step, applied to the
    columns) but by no more than `max_step` either way, held within [low, high]
    (log seconds, the merging worker's bounds).
    """
    values = [
        {
            "resolution": s.key[0],
            "n": s.key[1],
            "images": s.key[2],
            "log_first": min(high, max(low, s.log_seed)),
            "hits": s.hits,
            "misses": s.misses,
            "seeded": s.seeded,
            "updated_at": now,
        }
        for s in seen
    ]
    if not values:
        return
    dialect = (ex.dialect if isinstance(ex, Connection) else ex.get_bind().dialect).name
    stmt: Any = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(_shapes).values(values)
    raw = moved(stmt.excluded.hits, stmt.excluded.misses)
    most = literal(max_step, Float)
    target = _shapes.c.log_first + case((raw > most, most), (raw < -most, -most), else_=raw)
    lo, hi = literal(low, Float), literal(high, Float)
    stmt = stmt.on_conflict_do_update(
        index_elements=[_shapes.c.resolution, _shapes.c.n, _shapes.c.images],
        set_={
            "log_first": case((target < lo, lo), (target > hi, hi), else_=target),
            "hits": _shapes.c.hits + stmt.excluded.hits,
            "misses": _shapes.c.misses + stmt.excluded.misses,
            "updated_at": stmt.excluded.updated_at,
        },
    )
    ex.execute(stmt)
