"""An index of the outbox rows not settled yet, for the backlog every metrics scrape reads.

Without it the backlog query (models.outbox.backlog: state in waiting, pending) read the
whole deliveries history; bench/scale.py measured about 10 ms at 100,000 ended jobs and
1 ms with the index.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UNSETTLED = sa.text("state IN ('waiting', 'pending')")


def upgrade() -> None:
    op.create_index(
        "ix_deliveries_unsettled", "deliveries", ["state"], postgresql_where=UNSETTLED, sqlite_where=UNSETTLED
    )


def downgrade() -> None:
    op.drop_index("ix_deliveries_unsettled", "deliveries")
