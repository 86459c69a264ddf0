"""The fleet's shared API budget: one row that every worker on every host reads and locks."""

from __future__ import annotations

from sqlalchemy import Float, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from models.job import Base


class ApiBudget(Base):
    __tablename__ = "api_budget"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    # GCRA: the time (epoch seconds) of the next free request slot. Each request
    # takes the slot and moves it on by 1/MODELLIX_MAX_RPS.
    next_slot: Mapped[float] = mapped_column(Float, default=0.0)
    # After a 429 (or 401/402), nobody in the fleet calls the API before this.
    paused_until: Mapped[float] = mapped_column(Float, default=0.0)
    pause_reason: Mapped[str | None] = mapped_column(Text)
