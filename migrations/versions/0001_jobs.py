"""The jobs table.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSONDoc = sa.JSON().with_variant(JSONB(), "postgresql")
Stamp = sa.DateTime(timezone=True)
ACTIVE = sa.text("status IN ('submitted', 'processing')")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("modellix_task_id", sa.String(128), unique=True),
        sa.Column("request", JSONDoc, nullable=False),
        sa.Column("metadata", JSONDoc),
        sa.Column("result_urls", JSONDoc),
        sa.Column("error_code", sa.String(64)),
        sa.Column("error_message", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("polls", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_poll_at", Stamp),
        sa.Column("last_response", JSONDoc),
        sa.Column("created_at", Stamp, nullable=False),
        sa.Column("updated_at", Stamp, nullable=False),
        sa.Column("submitted_at", Stamp),
        sa.Column("finished_at", Stamp),
    )
    op.create_index("ix_jobs_status_updated", "jobs", ["status", "updated_at"])
    op.create_index("ix_jobs_created_at", "jobs", ["created_at"])
    op.create_index("ix_jobs_next_poll", "jobs", ["next_poll_at"], postgresql_where=ACTIVE, sqlite_where=ACTIVE)


def downgrade() -> None:
    op.drop_table("jobs")
