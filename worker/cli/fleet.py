"""The fleet's budget as the CLI shows it (`jobs stats`, `doctor`, why a queued job waits): the limits,
the tasks in flight and any pause, read from the budget row (worker.fleet holds the rules)."""

from __future__ import annotations

import time
from typing import Any

from models import budget
from models.db import Executor
from worker.config import Settings


def status(cfg: Settings, ex: Executor) -> dict[str, Any]:
    """The limits, the tasks in flight and any pause, for `jobs stats`."""
    row = budget.read(ex)
    now = time.time()
    paused_for: float = 0
    reason: str | None = None
    if row is not None and row.paused_until > now:
        paused_for, reason = round(row.paused_until - now, 1), row.pause_reason
    return {
        "max_rps": cfg.max_rps,
        "max_in_flight": cfg.max_in_flight,
        "in_flight": budget.count_in_flight(ex),
        "paused_for": paused_for,
        "pause_reason": reason,
    }
