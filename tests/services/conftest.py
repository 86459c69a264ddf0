"""tests/services: the tests that need PostgreSQL, RabbitMQ or Redis (marked `services` by folder).

A module here may import a tests/unit module whole (`from tests.unit.test_x import *`): that module's
tests that take a database (`any_db_url`, or `service` which does) run here again on PostgreSQL, and
its other tests, which already ran in tests/unit, are left out.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def any_db_url(pg_url) -> str:
    return pg_url


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept, repeats = [], []
    for item in items:
        imported = isinstance(item, pytest.Function) and item.function.__module__ != item.module.__name__
        here = "tests.services." in item.module.__name__ if isinstance(item, pytest.Function) else False
        if here and imported and "any_db_url" not in item.fixturenames:
            repeats.append(item)
        else:
            kept.append(item)
    if repeats:
        config.hook.pytest_deselected(items=repeats)
        items[:] = kept
