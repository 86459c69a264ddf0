"""tests/unit/test_learning.py's tests that take a database (`any_db_url`, or `service` which does),
again on PostgreSQL: tests/services/conftest.py makes `any_db_url` a PostgreSQL database here and
leaves out the imported tests that take none."""

from tests.unit.test_learning import *  # noqa: F403
