"""Run the Alembic migrations from code (`kling-worker db upgrade`)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations


def upgrade(database_url: str, revision: str = "head") -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    # `%` is interpolation syntax in Alembic's ini-style config.
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    command.upgrade(cfg, revision)
