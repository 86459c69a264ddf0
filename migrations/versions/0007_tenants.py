"""Tenants and priorities: the job table becomes the line submits are taken from (worker.queue).

Each job gets its tenant (existing rows: `default`), its priority (5), its place in line and
the time a retried job may be taken again; inline images wait in `payload` until the job is
sent. The `tenants` table holds each tenant's policy and share; `api_budget.fair_clock` the
fair-share clock (worker.fleet.share).

A job queued before this migration is placed in line by when it was created.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from datetime import UTC

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

QUEUED = sa.text("status = 'queued'")
OptionalJSONDoc = sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
Stamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("tenant", sa.String(64), nullable=False, server_default="default"))
        batch.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="5"))
        batch.add_column(sa.Column("line", sa.Float(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("due_at", Stamp))
        batch.add_column(sa.Column("payload", OptionalJSONDoc))
    jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("created_at", Stamp), sa.column("line"))
    conn = op.get_bind()
    waiting = conn.execute(sa.select(jobs.c.id, jobs.c.created_at).where(QUEUED)).all()
    for job_id, created_at in waiting:
        at = created_at if created_at.tzinfo else created_at.replace(tzinfo=UTC)  # SQLite's are naive UTC
        conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(line=at.timestamp()))
    op.create_index("ix_jobs_line", "jobs", ["tenant", "line"], postgresql_where=QUEUED, sqlite_where=QUEUED)
    op.create_index("ix_jobs_tenant_status", "jobs", ["tenant", "status"])
    op.create_table(
        "tenants",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("weight", sa.Float(), nullable=False, server_default="1"),
        sa.Column("max_in_flight", sa.Integer()),
        sa.Column("max_rps", sa.Float()),
        sa.Column("vtime", sa.Float(), nullable=False, server_default="0"),
        sa.Column("next_slot", sa.Float(), nullable=False, server_default="0"),
        sa.Column("updated_at", Stamp),
    )
    with op.batch_alter_table("api_budget") as batch:
        batch.add_column(sa.Column("fair_clock", sa.Float(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("api_budget") as batch:
        batch.drop_column("fair_clock")
    op.drop_table("tenants")
    op.drop_index("ix_jobs_tenant_status", "jobs")
    op.drop_index("ix_jobs_line", "jobs")
    with op.batch_alter_table("jobs") as batch:
        for name in ("payload", "due_at", "line", "priority", "tenant"):
            batch.drop_column(name)
