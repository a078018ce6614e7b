"""Crash counter of a job: claims that ended with their worker process dying.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NOT NULL with a server default: existing rows get 0, in place on SQLite too.
    op.add_column(
        "job", sa.Column("crashes", sa.Integer(), nullable=False, server_default=sa.text("0"))
    )


def downgrade() -> None:
    with op.batch_alter_table("job") as batch:
        batch.drop_column("crashes")
