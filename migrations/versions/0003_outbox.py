"""Result delivery: where the caller wants to hear of the job's end, its archived files, and the outbox.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

JSONDoc = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
PENDING = sa.text("state = 'pending'")


def upgrade() -> None:
    op.add_column("jobs", sa.Column("webhook", sa.Text))
    op.add_column("jobs", sa.Column("callback", JSONDoc))
    op.add_column("jobs", sa.Column("files", JSONDoc))
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("due_at", sa.DateTime(timezone=True)),
        sa.Column("last_error", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("job_id", "channel", name="uq_deliveries_job_channel"),
    )
    op.create_index("ix_deliveries_due", "deliveries", ["due_at"], postgresql_where=PENDING, sqlite_where=PENDING)
    op.create_index("ix_deliveries_job", "deliveries", ["job_id"])


def downgrade() -> None:
    op.drop_table("deliveries")
    op.drop_column("jobs", "files")
    op.drop_column("jobs", "callback")
    op.drop_column("jobs", "webhook")
