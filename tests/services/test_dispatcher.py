"""tests/unit/test_dispatcher.py's tests again, on PostgreSQL."""

from __future__ import annotations

from tests.unit.test_dispatcher import *  # noqa: F403
