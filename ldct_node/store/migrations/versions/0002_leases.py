"""Leases for scale-out: a running job's lease, a forward's sender claim.

Revision ID: 0002
Revises: 0001
Create Date: 2024-06-15
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (nullable, no default) works in place on SQLite and PostgreSQL.
    op.add_column("job", sa.Column("lease_expires_at", sa.DateTime(), nullable=True))
    op.add_column("forward", sa.Column("claimed_by", sa.String(128), nullable=True))
    op.add_column("forward", sa.Column("claim_expires_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("forward") as batch:
        batch.drop_column("claim_expires_at")
        batch.drop_column("claimed_by")
    with op.batch_alter_table("job") as batch:
        batch.drop_column("lease_expires_at")
