"""The fleet-wide API budget row.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "api_budget",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("next_slot", sa.Float, nullable=False, server_default="0"),
        sa.Column("paused_until", sa.Float, nullable=False, server_default="0"),
        sa.Column("pause_reason", sa.Text),
    )
    op.bulk_insert(table, [{"name": "modellix", "next_slot": 0.0, "paused_until": 0.0}])


def downgrade() -> None:
    op.drop_table("api_budget")
